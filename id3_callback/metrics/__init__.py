"""Local `evaluate` metric modules (glue, rouge, gsm8k) that load by file path, online or offline.

Scripts call `evaluate.load(metric_path("glue"), "sst2")` instead of `evaluate.load("glue", "sst2")`, which
would fetch the metric script from the Hugging Face hub.

Example:
    >>> from id3_callback.metrics import load_metric
    >>> load_metric("glue", "sst2").compute(predictions=[1, 0], references=[1, 1])
    {'accuracy': 0.5}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE_METRICS = ("glue", "rouge", "gsm8k")


def metric_path(name: str) -> str:
    """Absolute path of the local metric module file `<name>/<name>.py`.

    Example:
        >>> metric_path("rouge").endswith("rouge/rouge.py")
        True
    """
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"No local metric {name!r} at {path}; available: {list(AVAILABLE_METRICS)}")
    return str(path)


def load_metric(name: str, config_name: str | None = None, **kwargs: Any):
    """`evaluate.load` on the local metric module `name`; kwargs go to `evaluate.load`.

    Example:
        >>> glue = load_metric("glue", "cola")
        >>> sorted(glue.compute(predictions=[0, 1, 1], references=[0, 1, 0]))
        ['matthews_correlation']
    """
    import evaluate  # deferred: importing evaluate costs seconds and most callers never need it

    return evaluate.load(metric_path(name), config_name, **kwargs)


__all__ = ["AVAILABLE_METRICS", "METRICS_DIR", "load_metric", "metric_path"]
