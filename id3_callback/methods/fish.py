"""FISH mask: the B entries of largest (empirical) Fisher information before training, fixed.

Fisher estimate: F_i = sum over batches b of (d mean_loss_b / d theta_i)^2, over the first batches of a
seeded random order until `ID3Config.fisher_samples` samples are seen (the last batch is used whole). These
are per-batch squared gradients, not per-sample ones: one backward per batch instead of one per sample, at the
price of cross-sample terms inside a batch. The scale does not matter, only the ranking.

The pass runs in eval mode (no dropout: the estimate is of the model as given, and deterministic) and then
restores every module's train/eval flag, every `.grad`, and the torch (CPU and CUDA), Python and NumPy
random states, so training after it draws exactly the random numbers it would have drawn without it. It
changes no weight (no optimizer step happens).

Data: `engine.fisher_batches`, a zero-argument callable returning an iterable of (loss, batch size).
`ID3Trainer` sets it to `trainer_fisher_batches(trainer)`; outside the Trainer pass
`engine.start(T, fisher_batches=...)`.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from .base import SelectionMethod, register_method
from .common import add_selected, top_entries


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
    engine, batches: Iterable[tuple[torch.Tensor, int]], samples: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Per selectable tensor, the sum of squared per-batch gradients (float32); and the samples used.

    Leaves the model's weights, gradients, train/eval flags and the RNG states as they were.

    Example:
        >>> batches = ((model(**b).loss, len(b["labels"])) for b in loader)  # doctest: +SKIP
        >>> fisher, used = fisher_information(engine, batches, samples=256)    # doctest: +SKIP
    """
    model = engine.model
    params = engine.unmasked.params
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
        raise ValueError("the Fisher pass got no data: fisher_batches yielded no batch.")
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
        >>> engine.start(T, fisher_batches=lambda: ((loss_fn(b), len(b)) for b in loader))   # doctest: +SKIP
    """

    incremental = False

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.samples_used = 0

    def on_start(self) -> None:
        engine = self.engine
        if engine.fisher_batches is None:
            raise ValueError(
                "method 'fish' needs training data before training: use ID3Trainer, or pass "
                "engine.start(total_steps, fisher_batches=fn) where fn() yields (loss, batch_size) pairs."
            )
        fisher, self.samples_used = fisher_information(
            engine, engine.fisher_batches(), engine.config.fisher_samples
        )
        values, index, _ = top_entries(
            engine, engine.budget, lambda name, p, start, stop: fisher[name].reshape(-1)[start:stop].clone()
        )
        add_selected(engine, values, index)

    def describe(self) -> str:
        used = f" ({self.samples_used:,} samples)" if self.samples_used else ""
        return f"FISH: top-B Fisher information{used} before training, fixed"

    def state_dict(self) -> dict:
        return {"samples_used": self.samples_used}

    def load_state_dict(self, state: dict) -> None:
        self.samples_used = int(state.get("samples_used", 0))


def _batch_size(inputs: dict) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("cannot tell the batch size: no tensor among the inputs.")


def trainer_fisher_batches(trainer) -> Iterator[tuple[torch.Tensor, int]]:
    """The Trainer's training data as (loss, batch size) pairs for the Fisher pass.

    A plain DataLoader over `train_dataset` (same collator, column removal and batch size as training) in a
    random order seeded by the engine's seed. It never touches the training DataLoader: an accelerate-prepared
    loader that is left early stays registered as active, and its sampler's epoch counter would move. The loss
    is `trainer.compute_loss` on the wrapped model, so under DDP every rank sees the same, all-reduced gradients.

    Example:
        >>> engine.fisher_batches = functools.partial(trainer_fisher_batches, trainer)  # doctest: +SKIP
    """
    from torch.utils.data import DataLoader, IterableDataset, RandomSampler

    dataset, collator = trainer.train_dataset, trainer.data_collator
    try:
        import datasets

        is_hf = isinstance(dataset, datasets.Dataset)
    except ImportError:
        is_hf = False
    if is_hf:
        dataset = trainer._remove_unused_columns(dataset, description="Fisher")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="Fisher")
    sampler = None
    if not isinstance(dataset, IterableDataset):
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(trainer.engine.seed))
    loader = DataLoader(dataset, batch_size=trainer._train_batch_size, sampler=sampler, collate_fn=collator)
    model = trainer.model_wrapped
    for batch in loader:
        inputs = trainer._prepare_inputs(batch)
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        yield loss, _batch_size(inputs)
