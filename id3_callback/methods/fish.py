"""FISH mask: the B entries of largest (empirical) Fisher information before training, fixed.

Fisher estimate: F_i = sum over batches b of (d mean_loss_b / d theta_i)^2, over the first batches of a
seeded random order until `ID3Config.fisher_samples` samples are seen (the last batch is used whole). These
are per-batch squared gradients, not per-sample ones: one backward per batch instead of one per sample, at the
price of cross-sample terms inside a batch. The scale does not matter, only the ranking.

The pass runs in eval mode (no dropout: the estimate is of the model as given, and deterministic) and then
restores every module's train/eval flag, every `.grad`, and the torch (CPU and CUDA), Python and NumPy
random states, so training after it draws exactly the random numbers it would have drawn without it. It
changes no weight (no optimizer step happens).

Data: the calibration batches (`StepContext.calibration_batches`), a zero-argument callable returning an
iterable of (loss, batch size). `ID3Trainer` hands in its training data (`trainer_calibration_batches`);
outside the Trainer pass `engine.start(T, calibration_batches=...)`.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from .base import Selection, SelectionMethod, StepContext, register_method


@contextmanager
def preserved_rng(devices: list[int]):
    """Restore the torch (CPU + given CUDA devices), Python and NumPy RNG states on exit."""
    py_state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # numpy is optional for the engine
        np, np_state = None, None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)


@torch.enable_grad()
def fisher_information(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[tuple[torch.Tensor, int]],
    samples: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """Per selectable tensor, the sum of squared per-batch gradients (float32); and the samples used.

    Leaves the model's weights, gradients, train/eval flags and the RNG states as they were.

    Example:
        >>> batches = ((model(**b).loss, len(b["labels"])) for b in loader)  # doctest: +SKIP
        >>> fisher, used = fisher_information(model, params, batches, samples=256)  # doctest: +SKIP
    """
    all_params = list(model.parameters())
    saved_grads = [p.grad for p in all_params]
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index or 0 for p in all_params if p.device.type == "cuda"})
    fisher = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    seen = 0
    iterator = iter(())
    try:
        with preserved_rng(devices):
            model.eval()
            for p in all_params:
                p.grad = None
            iterator = iter(batches)
            for loss, size in iterator:
                loss.backward()
                for name, p in params.items():
                    if p.grad is not None:
                        grad = p.grad.float()
                        fisher[name].addcmul_(grad, grad)
                for p in all_params:
                    p.grad = None
                seen += int(size)
                if seen >= samples:
                    break
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        for p, grad in zip(all_params, saved_grads):
            p.grad = grad
        for module, mode in modes:
            module.training = mode
    if seen == 0:
        raise ValueError("the Fisher pass got no data: calibration_batches yielded no batch.")
    if seen < samples:
        warnings.warn(
            f"the Fisher estimate used {seen:,} samples, fewer than fisher_samples={samples:,}: "
            "the training data ran out.",
            stacklevel=2,
        )
    return fisher, seen


@register_method("fish")
class FishMask(SelectionMethod):
    """Chooses the whole budget before training by Fisher information (ties: lower global index first).

    Example:
        >>> engine = ID3Engine(model, ID3Config(method="fish", budget=1000, fisher_samples=256))  # doctest: +SKIP
        >>> engine.start(T, calibration_batches=lambda: ((loss_fn(b), len(b)) for b in loader))  # doctest: +SKIP
    """

    incremental = False

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.samples_used = 0

    def on_start(self, ctx: StepContext) -> Selection:
        if ctx.calibration_batches is None:
            raise ValueError(
                "method 'fish' needs training data before training: use ID3Trainer, or pass "
                "engine.start(total_steps, calibration_batches=fn) where fn() yields (loss, batch_size) pairs."
            )
        engine = self.engine
        fisher, self.samples_used = fisher_information(
            engine.model, engine.unmasked.params, ctx.calibration_batches(), engine.config.fisher_samples
        )
        scores, index, _ = ctx.scan.top_entries(
            ctx.budget, lambda name, p, start, stop: fisher[name].reshape(-1)[start:stop].clone()
        )
        return Selection(index, scores)

    def describe(self) -> str:
        used = f" ({self.samples_used:,} samples)" if self.samples_used else ""
        return f"FISH: top-B Fisher information{used} before training, fixed"

    def state_dict(self) -> dict:
        return {"samples_used": self.samples_used}

    def load_state_dict(self, state: dict) -> None:
        self.samples_used = int(state.get("samples_used", 0))
