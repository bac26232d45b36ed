"""Mask logging: a density heatmap PNG in `output_dir` for every run, and W&B panels when reporting to W&B.

`ID3Trainer` calls `attach_logging(trainer)` itself; import from here to configure the callbacks by hand.

Example:
    >>> from id3_callback.logging import ID3WandbCallback
    >>> callbacks = [ID3Callback(config), ID3WandbCallback(heatmap_steps=100)]  # doctest: +SKIP

Other modules of `id3_callback` use `import logging` with absolute imports, so this package never
shadows the standard library's `logging`.
"""

from __future__ import annotations

import logging

from .plots import (
    HEATMAP_FILE,
    DensityGrid,
    MaskHeatmapCallback,
    density_grid,
    heatmap_figure,
    matplotlib_available,
    parse_param_name,
    save_heatmap,
    tensor_counts,
)
from .wandb import ID3WandbCallback  # imports the `wandb` package only when a run logs

logger = logging.getLogger("id3_callback")


def _reports_to_wandb(args) -> bool:
    report_to = args.report_to or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return "wandb" in report_to or "all" in report_to


_warned_no_matplotlib = False


def _warn_no_matplotlib() -> None:
    # Once per process: a sweep of many trainers should not repeat it.
    global _warned_no_matplotlib
    if not _warned_no_matplotlib:
        _warned_no_matplotlib = True
        logger.warning(
            "matplotlib is not installed: no mask_density.png heatmap. Install it with "
            "pip install 'id3-callback[plots]' (or pip install matplotlib)."
        )


def attach_logging(trainer) -> None:
    """Bind mask-logging callbacks to `trainer.id3`, adding the defaults that are missing.

    Defaults: `MaskHeatmapCallback` (when matplotlib is installed) and, when `report_to` includes
    "wandb", `ID3WandbCallback`. Instances the user passed in `callbacks` are kept as they are.
    """
    handler = trainer.callback_handler
    kinds = (MaskHeatmapCallback, ID3WandbCallback)
    if matplotlib_available():
        if not any(isinstance(cb, MaskHeatmapCallback) for cb in handler.callbacks):
            handler.add_callback(MaskHeatmapCallback())
    else:
        _warn_no_matplotlib()
    if _reports_to_wandb(trainer.args) and not any(
        isinstance(cb, ID3WandbCallback) for cb in handler.callbacks
    ):
        if matplotlib_available():
            handler.add_callback(ID3WandbCallback())
        else:
            logger.warning(
                "ID3 mask logging to W&B needs matplotlib and pillow: pip install 'id3-callback[wandb]'."
            )
    for cb in handler.callbacks:
        if isinstance(cb, kinds):
            cb.bind(trainer.id3)


__all__ = [
    "HEATMAP_FILE",
    "DensityGrid",
    "ID3WandbCallback",
    "MaskHeatmapCallback",
    "attach_logging",
    "density_grid",
    "heatmap_figure",
    "parse_param_name",
    "save_heatmap",
    "tensor_counts",
]
