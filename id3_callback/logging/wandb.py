"""`ID3WandbCallback`: the unmasked set in Weights & Biases (online or `WANDB_MODE=offline`).

What it logs, on top of the Trainer's own `train/id3/*` scalars (budget used, entries unmasked, ...):
- `id3/mask_density`: the layers x module-types heatmap image, every `heatmap_steps` steps and at the end;
- `id3/selected_score_log10`: a histogram of log10 D3 scores of the entries chosen since the last log,
  plus `id3/selected_score_min` / `_median` / `_max` scalars;
- `id3/unmasked_per_tensor` and `id3/unmasked_per_layer`: tables of counts, at the end;
- the final sparse delta as an artifact of type `id3-delta` (`delta.safetensors` in `output_dir`).

`ID3Trainer` adds it automatically when `"wandb"` is in `TrainingArguments.report_to`; pass your own
instance in `callbacks` to change its settings. It logs into the run the Trainer's `WandbCallback`
opened, with `train/global_step` as the x axis, so its panels line up with the loss curve.
"""

from __future__ import annotations

import io
import logging
import math
import os
from typing import TYPE_CHECKING

import numpy as np
from transformers import TrainerCallback

from .plots import density_grid, figure_png, heatmap_figure, heatmap_title, log10_scores, tensor_counts

if TYPE_CHECKING:
    from ..callback import ID3Callback

logger = logging.getLogger("id3_callback")
DELTA_FILE = "delta.safetensors"


class ID3WandbCallback(TrainerCallback):
    """Logs the ID3 mask (heatmaps, counts, selected scores, final delta) to the active W&B run.

    Args:
        heatmap_steps: log a heatmap every this many optimizer steps (and at the end); None: about ten
            per run (max_steps / 10); 0: only at the end.
        log_delta: log the final delta as a W&B artifact.
        max_scores: cap on the scores kept between two logs for the histogram (a random subset beyond).

    Example:
        >>> trainer = ID3Trainer(model=model, args=TrainingArguments("out", report_to=["wandb"]),
        ...                      train_dataset=ds, callbacks=[ID3Callback(config), ID3WandbCallback(heatmap_steps=50)])
        ...                      # doctest: +SKIP
    """

    def __init__(self, heatmap_steps: int | None = None, log_delta: bool = True, max_scores: int = 100_000):
        if heatmap_steps is not None and heatmap_steps < 0:
            raise ValueError(f"heatmap_steps must be >= 0 or None (got {heatmap_steps}).")
        self.heatmap_steps = heatmap_steps
        self.log_delta = log_delta
        self.max_scores = max_scores
        self.id3: ID3Callback | None = None
        self._every = 0
        self._scores: list[np.ndarray] = []
        self._last_scores = None
        self._rng = np.random.default_rng(0)
        self.artifact_name: str | None = None

    def bind(self, id3: ID3Callback) -> None:
        self.id3 = id3

    # -------------------------------------------------------------------------------------------- helpers
    @property
    def engine(self):
        return self.id3.engine if self.id3 is not None else None

    @staticmethod
    def _run():
        import wandb

        return wandb.run

    def _log(self, data: dict, step: int) -> None:
        run = self._run()
        if run is not None:
            run.log({**data, "train/global_step": step})

    def _collect_scores(self) -> None:
        """Keep the scores of the latest selection, once (the engine overwrites them on the next one)."""
        scores = getattr(self.engine, "last_selected_scores", None)
        if scores is None or scores is self._last_scores:
            return
        self._last_scores = scores
        values = log10_scores(scores.float().numpy())
        if values.size:
            self._scores.append(values)

    def _heatmap(self, step: int) -> dict:
        import wandb
        from PIL import Image

        records = tensor_counts(self.engine)
        fig = heatmap_figure(density_grid(records), heatmap_title(self.engine, step))
        image = Image.open(io.BytesIO(figure_png(fig)))
        return {"id3/mask_density": wandb.Image(image, caption=f"step {step}")}

    # ---------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, **kwargs):
        if self.engine is None or not state.is_world_process_zero:
            return
        steps = state.max_steps or 1
        self._every = self.heatmap_steps if self.heatmap_steps is not None else max(1, math.ceil(steps / 10))
        run = self._run()
        if run is None:
            logger.warning(
                "ID3WandbCallback: no active W&B run (is 'wandb' in report_to, before this callback?); "
                "mask logging is off for this run."
            )
            return
        engine = self.engine
        run.config.update({"id3": engine.config.to_dict()}, allow_val_change=True)
        run.summary["id3/budget"] = engine.budget
        run.summary["id3/selectable"] = engine.selectable
        run.summary["id3/dense_entries"] = engine.dense_entries
        self._collect_scores()  # static methods choose their whole mask before the first step

    def on_step_end(self, args, state, control, **kwargs):
        if self.engine is None or not state.is_world_process_zero:
            return
        self._collect_scores()
        if self._every and state.global_step % self._every == 0 and state.global_step < state.max_steps:
            self._log(self._heatmap(state.global_step), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.engine is None or not state.is_world_process_zero or not self._scores:
            return
        import wandb

        values = np.concatenate(self._scores)
        self._scores = []
        if values.size > self.max_scores:
            values = self._rng.choice(values, self.max_scores, replace=False)
        self._log(
            {
                "id3/selected_score_log10": wandb.Histogram(values),
                "id3/selected_score_min": float(10 ** values.min()),
                "id3/selected_score_median": float(10 ** np.median(values)),
                "id3/selected_score_max": float(10 ** values.max()),
            },
            state.global_step,
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is None or not state.is_world_process_zero or self._run() is None:
            return
        import wandb

        step = state.global_step
        records = tensor_counts(self.engine)
        columns = ["name", "layer", "module", "unmasked", "numel", "density", "dense"]
        rows = [
            [r["name"], -1 if r["layer"] is None else r["layer"], r["module"]]
            + [r["unmasked"], r["numel"], r["density"], r["dense"]]
            for r in records
        ]
        grid = density_grid(records)
        per_layer = [[label, u, n, u / max(n, 1)] for label, u, n in grid.row_totals()]
        data = self._heatmap(step)
        data["id3/unmasked_per_tensor"] = wandb.Table(columns=columns, data=rows)
        data["id3/unmasked_per_layer"] = wandb.Table(
            columns=["layer", "unmasked", "numel", "density"], data=per_layer
        )
        self._log(data, step)
        if self.log_delta and args.output_dir:
            self._log_delta(args.output_dir)

    def _log_delta(self, output_dir: str) -> None:
        import wandb

        from ..delta import save_delta

        run = self._run()
        path = save_delta(self.engine, os.path.join(output_dir, DELTA_FILE))
        engine = self.engine
        self.artifact_name = f"id3-delta-{run.id}"
        artifact = wandb.Artifact(
            self.artifact_name,
            type="id3-delta",
            description="ID3 sparse delta: fine-tuned values of the unmasked entries (apply with apply_delta).",
            metadata={
                "method": engine.config.method,
                "budget": engine.budget,
                "unmasked": len(engine.unmasked),
                "dense_entries": engine.dense_entries,
                "steps": engine.steps_done,
                "bytes": os.path.getsize(path),
            },
        )
        artifact.add_file(path, name=DELTA_FILE)
        run.log_artifact(artifact)


__all__ = ["DELTA_FILE", "ID3WandbCallback"]
