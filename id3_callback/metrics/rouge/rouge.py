"""ROUGE as a local `evaluate` module, computed with Google's `rouge_score` package.

Differs from the hub's `rouge` metric in one deliberate way: the aggregate is the plain mean of the
per-example F-measures (the hub reports the bootstrap median, which wobbles slightly between runs).
`rougeLsum` splits summaries into sentences on newlines, so join sentences with "\\n" before scoring.

Example:
    >>> import evaluate
    >>> from id3_callback.metrics import metric_path
    >>> rouge = evaluate.load(metric_path("rouge"))
    >>> rouge.compute(predictions=["the cat sat"], references=["the cat sat down"])["rouge1"]
    0.8571428571428571
"""

from __future__ import annotations

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE-1/2/L/Lsum F-measure via the `rouge_score` package, averaged over examples."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated summaries (str).
    references: list of reference summaries (str), or a list of lists of references per prediction
        (the best-scoring reference counts, as in `rouge_score`'s `score_multi`).
    rouge_types: subset of ["rouge1", "rouge2", "rougeL", "rougeLsum"] (default: all four).
    use_stemmer: Porter-stem tokens before matching (default False).
    use_aggregator: return the mean F-measure per type (default True) or a list per example.
    tokenizer: optional object with a `tokenize(text) -> list[str]` method, passed to `rouge_score`.
Returns:
    {"rouge1": float, "rouge2": float, "rougeL": float, "rougeLsum": float} (lists if not aggregated).
"""

_CITATION = """@inproceedings{lin-2004-rouge,
  title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
  author = "Lin, Chin-Yew", booktitle = "Text Summarization Branches Out", year = "2004"
}"""

DEFAULT_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class Rouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(
        self,
        predictions,
        references,
        rouge_types=None,
        use_stemmer=False,
        use_aggregator=True,
        tokenizer=None,
    ) -> dict:
        rouge_types = list(rouge_types or DEFAULT_ROUGE_TYPES)
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer, tokenizer=tokenizer)
        per_type: dict[str, list[float]] = {t: [] for t in rouge_types}
        for pred, ref in zip(predictions, references):
            # score_multi takes the best reference; (target, prediction) is rouge_score's argument order.
            scores = scorer.score_multi(ref, pred) if isinstance(ref, list) else scorer.score(ref, pred)
            for t in rouge_types:
                per_type[t].append(float(scores[t].fmeasure))
        if not use_aggregator:
            return per_type
        return {t: (sum(v) / len(v) if v else 0.0) for t, v in per_type.items()}
