"""GSM8K final-answer accuracy as a local `evaluate` module.

The gold answer is the number after `####` in the reference. A prediction's answer is the first number
after its `####` if it has one, else the last number anywhere in the text (models that were not
trained on the `####` format usually end with the answer). Numbers are compared as values, so
"1,000", "$1000." and "1000.0" all equal "1000".

Example:
    >>> import evaluate
    >>> from id3_callback.metrics import metric_path
    >>> gsm8k = evaluate.load(metric_path("gsm8k"))
    >>> gsm8k.compute(predictions=["so she pays $1,000."], references=["500 + 500 = 1000\\n#### 1000"])
    {'accuracy': 1.0}
"""

from __future__ import annotations

import math
import re

import datasets
import evaluate

_DESCRIPTION = "Exact-match accuracy of the final numeric answer on GSM8K-style `#### <number>` answers."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated solutions (str).
    references: list of gold solutions ending in `#### <number>` (str).
Returns:
    {"accuracy": fraction of predictions whose final number equals the reference's}.
"""

_CITATION = """@article{cobbe2021gsm8k,
  title={Training Verifiers to Solve Math Word Problems},
  author={Cobbe, Karl and others}, journal={arXiv preprint arXiv:2110.14168}, year={2021}
}"""

# A sign, an optional currency sign, digits with optional thousands commas, and an optional fraction.
# A trailing "." (end of sentence) is left out of the match on purpose.
_NUMBER = re.compile(r"-?\$?-?\d[\d,]*(?:\.\d+)?")
_MARKER = "####"


def normalize_number(text: str) -> float | None:
    """Parse one number as written in GSM8K text; None if it does not parse.

    Example:
        >>> normalize_number("$1,000.")
        1000.0
    """
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if cleaned.startswith("--"):
        cleaned = cleaned[1:]
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_reference(text: str) -> float | None:
    """The number after `####` in a GSM8K reference answer.

    Example:
        >>> extract_reference("48 + 24 = 72\\n#### 72")
        72.0
    """
    _, marker, tail = text.rpartition(_MARKER)
    match = _NUMBER.search(tail) if marker else None
    return normalize_number(match.group()) if match else None


def extract_prediction(text: str) -> float | None:
    """The number after the first `####` in a generation, else the last number in it.

    Example:
        >>> extract_prediction("She earns 5 * 2 = 10 dollars.")
        10.0
    """
    _, marker, tail = text.partition(_MARKER)
    if marker:
        match = _NUMBER.search(tail)
        if match:
            return normalize_number(match.group())
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def answers_match(prediction: str, reference: str) -> bool:
    """Whether a generation's final number equals the reference's `####` number.

    Example:
        >>> answers_match("#### 1,000", "#### 1000")
        True
    """
    pred, gold = extract_prediction(prediction), extract_reference(reference)
    if pred is None or gold is None:
        return False
    return math.isclose(pred, gold, rel_tol=1e-9, abs_tol=1e-9)


class Gsm8k(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/openai/grade-school-math"],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        if not references:
            return {"accuracy": 0.0}
        hits = sum(answers_match(p, r) for p, r in zip(predictions, references))
        return {"accuracy": hits / len(references)}
