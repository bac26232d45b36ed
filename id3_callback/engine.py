"""`ID3Engine`: owns the unmasked set and grows it each step. No Trainer imports: it runs in any loop.

engine = ID3Engine(model, ID3Config(budget=10_000))
engine.start(total_steps=1000)
opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-4)
for batch in loader:
    model(**batch).loss.backward()
    engine.step()          # score, grow the set, zero masked gradients
    opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from .config import ID3Config
from .masks import UnmaskedSet
from .schedulers import Schedule
from .selection import CHUNK, INELIGIBLE, StreamingTopK

STATE_FILE = "id3_state.pt"
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _match(pattern: str | None, name: str) -> bool:
    return pattern is not None and re.search(pattern, name) is not None


def split_parameters(
    model: nn.Module, config: ID3Config
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(selectable, dense) trainable parameters by name, per include / exclude / dense."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(
            "the model has no trainable parameters: ID3 selects among parameters with requires_grad=True. "
            "Call model.requires_grad_(True) (or unfreeze the layers to fine-tune) before building the trainer."
        )
    for label, pattern in (("include", config.include), ("exclude", config.exclude), ("dense", config.dense)):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{label}={pattern!r} is not a valid regex: {err}") from None
    dense = {n: p for n, p in trainable.items() if _match(config.dense, n)}
    selectable = {
        n: p
        for n, p in trainable.items()
        if n not in dense
        and (config.include is None or _match(config.include, n))
        and not _match(config.exclude, n)
    }
    if config.dense is not None and not dense:
        raise ValueError(
            f"dense={config.dense!r} matches no trainable parameter. Some names: {list(trainable)[:6]}"
        )
    if not selectable:
        raise ValueError(
            f"include={config.include!r} / exclude={config.exclude!r} leave no selectable parameter. "
            f"Trainable names look like: {list(trainable)[:6]}. Adjust the regexes (they use re.search)."
        )
    return selectable, dense


class ID3Engine:
    """Selective fine-tuning state and the per-step unmasking logic.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> engine = ID3Engine(model, ID3Config(budget=3))
        >>> engine.start(total_steps=2)
        >>> model(torch.randn(8, 4)).pow(2).sum().backward()
        >>> engine.step()["unmasked"]
        2
    """

    def __init__(self, model: nn.Module, config: ID3Config | None = None, seed: int | None = None) -> None:
        from .methods import get_method

        self.config = config or ID3Config()
        self.model = model
        selectable, dense = split_parameters(model, self.config)
        self.selectable = sum(p.numel() for p in selectable.values())
        self.dense_entries = sum(p.numel() for p in dense.values())
        self.budget = self.config.resolve_budget(self.selectable)
        if self.config.dense_in_budget:
            if self.dense_entries >= self.budget:
                raise ValueError(
                    f"dense parameters hold {self.dense_entries:,} entries, all of the budget {self.budget:,}: "
                    "raise the budget or set dense_in_budget=False."
                )
            self.budget -= self.dense_entries
        self.seed = self.config.mask_seed if self.config.mask_seed is not None else (seed or 0)
        self.unmasked = UnmaskedSet(selectable, dense)
        self.method = get_method(self.config.method)(self)
        self.schedule: Schedule | None = None
        self.steps_done = 0  # optimizer steps seen by `step`
        self.updates_total = 0  # sum over steps of the number of trainable entries (the paper's update count)
        self.skipped_steps = 0
        self._log = {"selection_s": 0.0, "steps": 0, "new": 0}
        self.last_stats: dict = {}
        # Of the step in progress: the fp16 loss scale, and whether an overflow must cancel the growth.
        self.current_grad_scale, self.current_check_overflow = 1.0, False

    # ----------------------------------------------------------------------------------------------- setup
    def parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimizer should see: selectable ones, then dense ones."""
        return [*self.unmasked.params.values(), *self.unmasked.dense.values()]

    def start(self, total_steps: int) -> None:
        """Fix the schedule for `total_steps` optimizer steps; static methods choose their mask here."""
        if total_steps is None or total_steps < 1:
            raise ValueError(
                f"ID3 needs the number of optimizer steps T to spread the budget (got {total_steps}). "
                "Set max_steps, or give the dataset a length."
            )
        self.schedule = Schedule(self.config.scheduler, self.budget, total_steps)
        if self.steps_done == 0 and len(self.unmasked) == 0:
            self.method.on_start()

    def summary(self) -> str:
        pct = 100.0 * self.budget / max(self.selectable, 1)
        n_tensors = len(self.unmasked.params)
        lines = [
            f"ID3 [{self.config.method}]: budget {self.budget:,} of {self.selectable:,} selectable entries "
            f"({pct:.3g}%) in {n_tensors} tensors",
        ]
        if self.schedule is not None and self.method.incremental:
            lines.append(f"  schedule: {self.schedule.describe()}")
        lines.append(
            f"  score: |g| / (|theta| + {self.config.eps:g})^{self.config.exp:g}; optimizer: {self.config.optimizer}"
        )
        if self.unmasked.dense:
            where = "inside" if self.config.dense_in_budget else "outside"
            lines.append(
                f"  dense: {len(self.unmasked.dense)} tensors, {self.dense_entries:,} entries, {where} the budget"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------- scoring
    def push_scores(self, top: StreamingTopK, score_fn: ScoreFn, grad_scale: float = 1.0) -> bool:
        """Push every selectable entry's score into `top`, tensor by tensor, chunk by chunk.

        Already-unmasked entries and non-finite scores are ineligible; tensors without a gradient are
        skipped. Returns False if a non-finite gradient was seen (fp16 overflow).
        """
        finite = True
        inv_scale = 1.0 / grad_scale
        for name, p in self.unmasked.params.items():
            if p.grad is None:
                top.offset += p.numel()
                continue
            grad, weight = p.grad.detach().reshape(-1), p.detach().reshape(-1)
            idx = self.unmasked.indices[name]
            for start in range(0, grad.numel(), CHUNK):
                stop = min(start + CHUNK, grad.numel())
                scores = score_fn(grad[start:stop], weight[start:stop])
                if inv_scale != 1.0:
                    scores.mul_(inv_scale)
                if finite and not bool(torch.isfinite(scores).all()):
                    finite = False
                    torch.nan_to_num_(scores, nan=INELIGIBLE, posinf=INELIGIBLE)
                if idx.numel():
                    local = idx[(idx >= start) & (idx < stop)] - start if stop - start < grad.numel() else idx
                    scores.index_fill_(0, local, INELIGIBLE)
                top.push(scores)
        return finite

    def select_top(self, k: int, score_fn: ScoreFn) -> bool:
        """Unmask the k best still-masked entries under `score_fn` (on the current step's gradients).

        Returns False, unmasking nothing, when the step's gradients overflowed under an fp16 grad scaler.
        """
        top = StreamingTopK(k)
        finite = self.push_scores(top, score_fn, self.current_grad_scale)
        if not finite and self.current_check_overflow:
            return False
        self.add_global(top.result()[1])
        return True

    def add_global(self, global_index: torch.Tensor) -> None:
        """Unmask entries given by global flat index (selectable tensors in order, concatenated)."""
        from .selection import split_by_tensor

        sizes = [p.numel() for p in self.unmasked.params.values()]
        for name, local in zip(self.unmasked.params, split_by_tensor(global_index.cpu(), sizes)):
            self.unmasked.add(name, local)

    # ---------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, grad_scale: float = 1.0, check_overflow: bool = False) -> dict:
        """Call after backward, before clipping and the optimizer step: grow the set, mask the gradients.

        `grad_scale` is the fp16 loss scale (scores use unscaled gradients). With `check_overflow`, a step
        whose gradients hold Inf/NaN grows nothing (the optimizer will skip it); the shortfall carries over.
        """
        if self.schedule is None:
            raise RuntimeError("call engine.start(total_steps) before the first engine.step().")
        self.current_grad_scale, self.current_check_overflow = grad_scale, check_overflow
        t0 = time.perf_counter()
        before = len(self.unmasked)
        self.steps_done += 1
        k = self.schedule.target(self.steps_done) - before
        grew = self.method.on_step(k)
        if not grew:
            self.skipped_steps += 1
        self.unmasked.mask_gradients()
        new = len(self.unmasked) - before
        elapsed = time.perf_counter() - t0
        self.updates_total += len(self.unmasked) + self.dense_entries
        self._log["selection_s"] += elapsed
        self._log["steps"] += 1
        self._log["new"] += max(new, 0)
        self.last_stats = {
            "unmasked": len(self.unmasked),
            "new": new,
            "selection_s": elapsed,
            "skipped": not grew,
        }
        return self.last_stats

    def log_metrics(self) -> dict[str, float]:
        """Metrics since the last call, for the Trainer's log line."""
        steps = max(self._log["steps"], 1)
        static_updates = self.steps_done * (self.budget + self.dense_entries)
        metrics = {
            "id3/unmasked": len(self.unmasked),
            "id3/budget_used": len(self.unmasked) / max(self.budget, 1),
            "id3/new_per_step": self._log["new"] / steps,
            "id3/selection_ms": 1000.0 * self._log["selection_s"] / steps,
            "id3/updates_total": self.updates_total,
            "id3/updates_vs_static": self.updates_total / max(static_updates, 1),
        }
        self._log = {"selection_s": 0.0, "steps": 0, "new": 0}
        return metrics

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "format": "id3-engine-state/1",
            "config": self.config.to_dict(),
            "budget": self.budget,
            "steps_done": self.steps_done,
            "updates_total": self.updates_total,
            "skipped_steps": self.skipped_steps,
            "unmasked": self.unmasked.state_dict(),
            "method": self.method.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != "id3-engine-state/1":
            raise ValueError("not an ID3 engine state (missing format tag): was it written by id3_callback?")
        if state["budget"] != self.budget or state["config"]["method"] != self.config.method:
            raise ValueError(
                f"checkpoint was trained with method={state['config']['method']!r}, budget={state['budget']:,}; "
                f"this run has method={self.config.method!r}, budget={self.budget:,}. Resume with the same ID3Config."
            )
        self.unmasked.load_state_dict(state["unmasked"])
        self.steps_done = state["steps_done"]
        self.updates_total = state["updates_total"]
        self.skipped_steps = state["skipped_steps"]
        self.method.load_state_dict(state["method"])

    def save(self, directory: str | os.PathLike) -> str:
        """Write the state into `directory` atomically (temp file + rename); returns the file path."""
        path = os.path.join(directory, STATE_FILE)
        atomic_torch_save(self.state_dict(), path)
        return path

    def load(self, directory: str | os.PathLike) -> None:
        path = os.path.join(directory, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: this checkpoint has no ID3 state (saved without ID3Trainer?). "
                "Resume from a checkpoint written by ID3Trainer."
            )
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def atomic_torch_save(obj, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
