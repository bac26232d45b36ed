"""GLUE metrics as a local `evaluate` module, computed with scikit-learn and scipy.

Same config names and result keys as the hub's `glue` metric, but nothing is downloaded, so it also works
on machines without access to the Hugging Face hub.

Example:
    >>> import evaluate
    >>> from id3_callback.metrics import metric_path
    >>> glue = evaluate.load(metric_path("glue"), "mrpc")
    >>> glue.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'f1': 0.6666666666666666}
"""

from __future__ import annotations

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

_DESCRIPTION = """GLUE benchmark metrics: Matthews correlation (cola), accuracy (sst2, mnli*, qnli, rte, wnli,
hans), accuracy + F1 (mrpc, qqp) and Pearson + Spearman correlation (stsb)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (int class ids; floats for stsb).
    references: gold labels (int class ids; floats for stsb).
Returns:
    cola: {"matthews_correlation"}; stsb: {"pearson", "spearmanr"}; mrpc, qqp: {"accuracy", "f1"};
    every other task: {"accuracy"}.
"""

_CITATION = """@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer
          and Bowman, Samuel R.},
  booktitle={ICLR}, year={2019}
}"""

_ACCURACY_TASKS = ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans")
CONFIG_NAMES = ("cola", "stsb", "mrpc", "qqp", *_ACCURACY_TASKS)


def _accuracy(preds, labels) -> float:
    return float(sum(int(p == r) for p, r in zip(preds, labels)) / len(labels))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in CONFIG_NAMES:
            raise KeyError(f"Unknown GLUE config {self.config_name!r}; choose one of {list(CONFIG_NAMES)}")
        dtype = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}
            ),
            format="numpy",
            reference_urls=["https://gluebenchmark.com/"],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.config_name == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        if self.config_name in ("mrpc", "qqp"):
            return {
                "accuracy": _accuracy(predictions, references),
                "f1": float(f1_score(y_true=references, y_pred=predictions)),
            }
        return {"accuracy": _accuracy(predictions, references)}
