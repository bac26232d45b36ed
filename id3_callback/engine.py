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

import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from . import state as state_io
from .config import ID3Config
from .distributed import is_distributed
from .io import atomic_write
from .masks import UnmaskedSet
from .recompute import PointwiseRecompute
from .schedulers import Schedule
from .selection import SCORE_CHUNK, StreamingTopK, TensorScorer, nonzero_rows, split_by_tensor
from .sparse_grads import (
    RowSparseEmbeddings,
    TiedOutputStreams,
    as_coalesced,
    coalesced_rows,
    gather_entries,
    locate,
    row_sparse_candidates,
    tied_output_candidates,
)

STATE_FILE = state_io.STATE_FILE
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Embedding weights at least this large get the row-sparse D3 path (smaller ones are cheap to score whole).
ROW_SPARSE_MIN_ENTRIES = 1 << 16
# Tensors smaller than this (biases, norms) are scored together: per-tensor op overhead would dominate.
SMALL_TENSOR = 1 << 14
_TORCH_CLIPPING = (
    "max_grad_norm > 0 with a transformers version whose Trainer clips inline with torch's clip_grad_norm_, "
    "which reads only dense p.grad (upgrade transformers, or set max_grad_norm=0)"
)


@dataclass
class _LowMemoryPass:
    """One backward's worth of low-memory scoring: the running top-k (candidates carry their gradient)."""

    k: int
    top: StreamingTopK
    scorer: TensorScorer
    pending: list = field(default_factory=list)  # (name, offset, rows) of row-sparse tensors
    small: list = field(default_factory=list)  # (name, grad) of small tensors, scored together at the end
    seen: set = field(default_factory=set)
    # Tied tables whose output-layer rows were scored in backward: name -> (their unmasked entries' gradient
    # values so far, in the order of `unmasked.indices`, which the optimizer reads; the permutation sorting
    # that index). The token rows' values are filled in when the rest of the gradient arrives.
    streamed: dict = field(default_factory=dict)


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
        if (
            self.config.optimizer == "auto"
        ):  # a plain loop builds its own optimizer: SparseAdamW, as documented
            self.config = replace(self.config, optimizer="sparse_adamw")
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
        self.skipped_steps = 0  # optimizer steps that were due to grow the set and grew nothing
        # T of the run a loaded checkpoint state belongs to: `start` refuses another one.
        self.resumed_total_steps: int | None = None
        self._log = {"selection_s": 0.0, "steps": 0, "new": 0}
        self.last_stats: dict = {}
        # Scores of the entries the last select_top chose.
        self.last_selected_scores: torch.Tensor | None = None
        # Of the step in progress: the fp16 loss scale, and whether an overflow must cancel the growth.
        self.current_grad_scale, self.current_check_overflow = 1.0, False
        # Training data for methods that look at it before training ('fish'): a zero-argument callable returning
        # an iterable of (loss with graph, samples in the batch). ID3Trainer sets it; see `start`.
        self.fisher_batches: Callable[[], Iterable[tuple[torch.Tensor, int]]] | None = None
        # Speed: global offset of each selectable tensor; its sorted unmasked indices (cached per index tensor);
        # embedding weights whose gradient rows are checked for sparsity (dropped once one comes out dense).
        self._offsets: dict[str, int] = {}
        running = 0
        for name, p in selectable.items():
            self._offsets[name], running = running, running + p.numel()
        self._sorted_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Each tensor's best score at the last step: scoring the likely winners first raises the top-k's
        # threshold early, so later chunks are dropped after one max (the result does not depend on order).
        self._peaks: dict[str, float] = {}
        self._score_buffer: torch.Tensor | None = None  # D3 scratch (a few MiB), kept across steps
        # Row-sparse gradients scored this step: name -> (the gradient, its rows holding any nonzero bit).
        self._nonzero_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        self._row_sparse = {
            n for n, p in selectable.items() if id(p) in embeddings and p.numel() >= ROW_SPARSE_MIN_ENTRIES
        }
        # Row-sparse embedding gradients (`ID3Config.sparse_embedding_grads`, see `configure_sparse_grads`): the
        # tables that qualify, whether the mode is on, and its forward hooks while training.
        # Tables tied to an output layer qualify in low-memory mode only (`TiedOutputStreams`).
        self._sparse_tables = row_sparse_candidates(model, selectable, ROW_SPARSE_MIN_ENTRIES)
        self._tied_tables = tied_output_candidates(model, selectable, ROW_SPARSE_MIN_ENTRIES)
        self._sparse_hooks: RowSparseEmbeddings | None = None
        self._tied_streams: TiedOutputStreams | None = None
        # Low-memory mode (see `configure_low_memory`): gradient hooks, and the backward being scored.
        self.low_memory = bool(self.config.low_memory)
        self._hooks: list = []
        self._pass: _LowMemoryPass | None = None
        self.sparse_grads, self._sparse_auto = False, False
        self.configure_sparse_grads()
        self._recompute: PointwiseRecompute | None = None  # `ID3Config.recompute_pointwise`, from `start` on

    # ----------------------------------------------------------------------------------------------- setup
    def parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimizer should see: selectable ones, then dense ones."""
        return [*self.unmasked.params.values(), *self.unmasked.dense.values()]

    def start(
        self, total_steps: int, fisher_batches: Callable[[], Iterable[tuple[torch.Tensor, int]]] | None = None
    ) -> None:
        """Fix the schedule for `total_steps` optimizer steps; static methods choose their mask here.

        `fisher_batches` (outside the Trainer) feeds methods that need data before training, e.g. 'fish'.
        """
        if fisher_batches is not None:
            self.fisher_batches = fisher_batches
        if total_steps is None or total_steps < 1:
            raise ValueError(
                f"ID3 needs the number of optimizer steps T to spread the budget (got {total_steps}). "
                "Set max_steps, or give the dataset a length."
            )
        if self.resumed_total_steps is not None and total_steps != self.resumed_total_steps:
            raise state_io.StateError(
                f"the loaded ID3 state belongs to a run of {self.resumed_total_steps:,} optimizer steps, this run "
                f"has {total_steps:,}: the schedule would differ. Resume with max_steps={self.resumed_total_steps}, "
                "or start a new run (another output_dir)."
            )
        self.schedule = Schedule(self.config.scheduler, self.budget, total_steps)
        if self.steps_done == 0 and len(self.unmasked) == 0:
            self.method.on_start()
        if self.sparse_grads and is_distributed():  # the process group may not have existed at configure time
            self.configure_sparse_grads(auto=True)
        low_memory = self.configure_low_memory()
        if not low_memory and self.config.sparse_embedding_grads is None and not self._sparse_auto:
            # On by default in a plain loop only for the low-memory mode, which may have just fallen back.
            self.sparse_grads = False
        if self.sparse_grads and self._sparse_tables and self._sparse_hooks is None:
            self._sparse_hooks = RowSparseEmbeddings(self._sparse_tables)
        self._configure_recompute(low_memory)
        if low_memory:
            self._install_hooks()
            if self.sparse_grads and self._tied_tables and self._tied_streams is None:
                # One block of the output layer's gradient: about a score chunk (4 MiB).
                self._tied_streams = TiedOutputStreams(self._tied_tables, self._on_output_rows, SCORE_CHUNK)
            if self._score_buffer is None and self.unmasked.params:
                # Allocated now, not inside the first backward: a block that lives on, placed among
                # activations that are about to be freed, keeps the heap from reusing their space.
                device = next(iter(self.unmasked.params.values())).device
                self._score_buffer = torch.empty(SCORE_CHUNK, dtype=torch.float32, device=device)

    def _configure_recompute(self, low_memory: bool) -> None:
        want = self.config.recompute_pointwise
        if want is None:  # the low-memory mode's default
            want = low_memory
        if want and self._recompute is None:
            self._recompute = PointwiseRecompute(self.model)

    @property
    def recompute_active(self) -> bool:
        """True while pointwise recomputation is installed (`ID3Config.recompute_pointwise`, from `start` on)."""
        return self._recompute is not None

    def summary(self, optimizer: str | None = None) -> str:
        """The train-begin summary; `optimizer` says which optimizer runs and why (the Trainer glue knows)."""
        pct = 100.0 * self.budget / max(self.selectable, 1)
        n_tensors = len(self.unmasked.params)
        lines = [
            f"ID3 [{self.config.method}]: budget {self.budget:,} of {self.selectable:,} selectable entries "
            f"({pct:.3g}%) in {n_tensors} tensors",
        ]
        if self.schedule is not None and self.method.incremental:
            lines.append(f"  schedule: {self.schedule.describe()}")
        lines.append(f"  score: |g| / (|theta| + {self.config.eps:g})^{self.config.exp:g}")
        lines.append(f"  optimizer: {optimizer or self.config.optimizer}")
        if self.method.describe():
            lines.append(f"  method: {self.method.describe()}")
        if self.sparse_tables:
            lines.append(f"  row-sparse embedding gradients: {', '.join(self.sparse_tables)}")
        if self.streamed_tables:
            lines.append(
                f"  tied tables scored in blocks as backward computes them: {', '.join(self.streamed_tables)}"
            )
        if self.recompute_active:
            lines.append(
                "  pointwise recomputation: products and activations of kept tensors are redone in backward"
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
        skipped. Returns False if a non-finite score was seen (fp16 overflow). The result equals scoring
        everything, concatenating and taking the top-k; see `TensorScorer` for the shortcuts.
        """
        scorer = TensorScorer(score_fn, grad_scale, buffer=self._score_buffer)
        pending: list[tuple[str, int, torch.Tensor]] = []
        small, big = [], []
        for name, p in self.unmasked.params.items():
            if p.grad is not None:
                if p.grad.is_sparse:  # summed once here: masking and the optimizer then read the same rows
                    p.grad = as_coalesced(p.grad)
                (small if p.numel() < SMALL_TENSOR and not p.grad.is_sparse else big).append((name, p.grad))
        self._push_small(top, scorer, small)
        # Last step's best-scoring tensors first; ties (and the first step) in global order, which also lets
        # chunks that only tie the k-th score be dropped when they come after it.
        big.sort(key=lambda item: (-self._peaks.get(item[0], -math.inf), self._offsets[item[0]]))
        for name, grad in big:
            self._push_tensor(top, scorer, name, grad, pending)
        self._push_skipped_rows(top, scorer, pending)
        top.offset = self.selectable
        self._score_buffer = scorer.buffer
        return scorer.finite

    def _push_tensor(
        self, top: StreamingTopK, scorer: TensorScorer, name: str, grad: torch.Tensor, pending: list
    ) -> None:
        p, offset, excluded = self.unmasked.params[name], self._offsets[name], self._sorted_unmasked(name)
        if grad.is_sparse:  # a row-sparse gradient: its rows are given, every other row is exactly zero
            if scorer.zero_grad_scores_zero:
                rows, block = coalesced_rows(grad)
                self._peaks[name] = scorer.push_row_block(top, block, p, offset, rows, excluded)
                pending.append((name, offset, rows))
                return
            grad = grad.to_dense()  # a score that is not 0 at zero gradient must see every row
        if scorer.zero_grad_scores_zero and name in self._row_sparse:
            rows = nonzero_rows(grad)
            if rows is not None:
                self._peaks[name] = scorer.push_rows(top, grad, p, offset, rows, excluded)
                pending.append((name, offset, rows))
                # Masking then zeroes only these rows (low-memory mode frees the gradient: nothing to mask).
                if self._pass is None:
                    self._nonzero_rows[name] = (grad, rows)
                return
            self._row_sparse.discard(name)  # dense (e.g. tied to the output layer): stop checking it
        self._peaks[name] = scorer.push_flat(top, grad, p, offset, excluded)

    def _push_small(self, top: StreamingTopK, scorer: TensorScorer, small: list) -> None:
        names = [name for name, _ in small]
        scorer.push_many(
            top,
            [grad for _, grad in small],
            [self.unmasked.params[name] for name in names],
            [self._offsets[name] for name in names],
            [self._sorted_unmasked(name) for name in names],
        )

    def _push_skipped_rows(self, top: StreamingTopK, scorer: TensorScorer, pending: list) -> None:
        """Rows skipped by `push_rows` score 0, so they matter only when fewer than k scores are positive."""
        if pending and (not top.full or top.threshold() <= 0.0):
            for name, offset, rows in pending:
                p = self.unmasked.params[name]
                scorer.push_zero_rows(top, p, offset, rows, self._sorted_unmasked(name))

    def _sorted_unmasked(self, name: str) -> torch.Tensor:
        """Sorted unmasked indices of `name`, cached until the set's index tensor is replaced."""
        idx = self.unmasked.indices[name]
        cached = self._sorted_cache.get(name)
        if cached is None or cached[0] is not idx:
            cached = self._sorted_cache[name] = (idx, torch.sort(idx).values)
        return cached[1]

    def select_top(self, k: int, score_fn: ScoreFn) -> bool:
        """Unmask the k best still-masked entries under `score_fn` (on the current step's gradients).

        Returns False, unmasking nothing, when the step's gradients overflowed under an fp16 grad scaler.
        """
        top = StreamingTopK(k)
        finite = self.push_scores(top, score_fn, self.current_grad_scale)
        if not finite and self.current_check_overflow:
            return False
        values, index = top.result()
        self.last_selected_scores = values.detach().cpu()  # for logging (score histograms)
        self.add_global(index)
        return True

    def add_global(self, global_index: torch.Tensor) -> None:
        """Unmask entries given by global flat index (selectable tensors in order, concatenated)."""
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
        if self._recompute is not None and self._recompute.forwards == 0 and not self._recompute.warned:
            self._recompute.warned = True
            warnings.warn(
                "pointwise recomputation saw no forward of the model given to ID3Engine: the loop calls it "
                "through something that bypasses its forward hooks. Give the engine the module the loop "
                "calls, or set ID3Config(recompute_pointwise=False).",
                stacklevel=2,
            )
        t0 = time.perf_counter()
        before = len(self.unmasked)
        self.steps_done += 1
        k = self.schedule.target(self.steps_done) - before
        self._nonzero_rows = {}  # filled by this step's scoring, for this step's gradients only
        if self.low_memory_active or self._pass is not None:
            if grad_scale != 1.0:
                raise ValueError(
                    "low_memory=True cannot use fp16 loss scaling: the scaler unscales p.grad, which this mode "
                    "frees during backward. Train in bf16/fp32, or set ID3Config(low_memory=False)."
                )
            grew = self._finish_low_memory_pass(k)
        else:
            grew = self.method.on_step(k)
        # Rows found on this very gradient object only (a method may have scored something else).
        params = self.unmasked.params
        rows = {n: r for n, (g, r) in self._nonzero_rows.items() if params[n].grad is g}
        self._nonzero_rows = {}  # it holds gradients: kept past this step, they would outlive zero_grad
        self.unmasked.mask_gradients(rows)
        if self.low_memory_active:  # the sorted index copies the hooks need, made now rather than in backward
            for name in self.unmasked.params:
                self._sorted_unmasked(name)
        new = len(self.unmasked) - before
        if not grew or (k > 0 and new <= 0):  # an fp16 overflow, or no finite score: the share carries over
            self.skipped_steps += 1
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

    # --------------------------------------------------------------------------------- row-sparse gradients
    def sparse_grad_blockers(self, loss_scaling: bool = False, torch_clipping: bool = False) -> list[str]:
        """Why row-sparse embedding gradients cannot be used under these settings (empty list: they can).

        `torch_clipping`: the loop clips with `torch.nn.utils.clip_grad_norm_` rather than `clip_grad_norm_`.
        """
        reasons = []
        if self.config.optimizer != "sparse_adamw":
            reasons.append("optimizer='trainer' (a standard optimizer reads dense gradients)")
        if not self.method.sparse_grads:
            reasons.append(f"method={self.config.method!r} (it reads dense gradients)")
        if loss_scaling:
            reasons.append("fp16 loss scaling (the scaler's unscale and norm passes read dense gradients)")
        if is_distributed():
            reasons.append("DDP (its gradient all-reduce expects the dense layout)")
        if torch_clipping:
            reasons.append(_TORCH_CLIPPING)
        return reasons

    def configure_sparse_grads(
        self, loss_scaling: bool = False, auto: bool = False, torch_clipping: bool = False
    ) -> bool:
        """Decide `ID3Config.sparse_embedding_grads` for these settings; returns whether the mode is on.

        `auto` is what the default (None) means: ID3Trainer passes True, since it clips and takes the gradient
        norm through the engine; a plain loop keeps dense gradients unless the config says True or the
        low-memory mode is on (its hooks free `p.grad` of selectable tensors in backward, so the loop never
        sees the layout). An explicit True that cannot apply warns and falls back to dense gradients. Takes
        effect at `start`, which also streams tables tied to an output layer in low-memory mode.
        """
        self._sparse_auto = auto
        wanted = self.config.sparse_embedding_grads
        wanted = (auto or self.low_memory) if wanted is None else wanted
        reasons = self.sparse_grad_blockers(loss_scaling, torch_clipping) if wanted else []
        if reasons and self.config.sparse_embedding_grads:
            warnings.warn(
                f"ID3Config(sparse_embedding_grads=True) cannot apply with {'; '.join(reasons)}. Embedding "
                "gradients stay dense (the same selection, a slower backward).",
                stacklevel=2,
            )
        self.sparse_grads = bool(wanted) and not reasons
        return self.sparse_grads

    @property
    def sparse_tables(self) -> list[str]:
        """Names of the embedding tables whose backward is row-sparse right now (empty when the mode is off)."""
        return list(self._sparse_hooks.modules) if self._sparse_hooks is not None else []

    @property
    def streamed_tables(self) -> list[str]:
        """Names of the tied tables whose gradient is never built whole right now (low-memory mode only)."""
        return list(self._tied_streams.tables) if self._tied_streams is not None else []

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the gradients the optimizer will read, in O(B).

        The norm is `grad_norm()` (masked entries count as 0); every gradient is then scaled by
        min(1, max_norm / (norm + 1e-6)), as torch does, but selectable tensors only at their unmasked entries
        (the rest are 0): dense or row-sparse `p.grad`, or the low-memory mode's kept values. Call it after
        `engine.step()` (masking), before the optimizer step. Returns the norm before clipping.
        """
        grads = self._optimizer_grads()  # read once: for the norm, then scaled and written back
        norm = self._norm(grads)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        whole = []
        for p, idx, values in grads:
            if p.grad is None:  # the low-memory mode's kept values, scaled in place
                values.mul_(coef.to(p.device))
            elif p.grad.is_sparse:
                p.grad = as_coalesced(p.grad)
                p.grad._values().mul_(coef.to(p.device))
            elif idx is None:
                whole.append(p.grad)
            else:
                p.grad.view(-1).index_copy_(0, idx, values.mul_(coef.to(p.device)))
        if whole:
            torch._foreach_mul_(whole, coef.to(whole[0].device))
        return norm

    # ------------------------------------------------------------------------------------------ low memory
    def low_memory_blockers(
        self, accumulation_steps: int = 1, loss_scaling: bool = False, torch_clipping: bool = False
    ) -> list[str]:
        """Why the low-memory mode cannot run under these training settings (empty list: it can).

        Clipping by the global norm is fine as long as it goes through `clip_grad_norm_` (ID3Trainer's does);
        `torch_clipping` says the loop clips with `torch.nn.utils.clip_grad_norm_` instead.
        """
        reasons = []
        if accumulation_steps > 1:
            reasons.append(
                f"gradient_accumulation_steps={accumulation_steps} (it scores each gradient as backward completes "
                "it, so it needs the whole step's gradient in one backward)"
            )
        if loss_scaling:
            reasons.append("fp16 loss scaling (the scaler unscales p.grad, which this mode frees; use bf16)")
        if torch_clipping:
            reasons.append(_TORCH_CLIPPING)
        if self.config.optimizer != "sparse_adamw":
            reasons.append("optimizer='trainer' (a standard optimizer reads dense gradients)")
        if self._method_score_fn() is None:
            reasons.append(
                f"method={self.config.method!r} (only methods that grow the set by a score, e.g. 'id3')"
            )
        return reasons

    def configure_low_memory(self, **settings) -> bool:
        """Keep `ID3Config.low_memory` on if these settings allow it, else warn and use the standard mode.

        `settings` are those of `low_memory_blockers`. Returns whether the low-memory mode is on.
        """
        if self.low_memory:
            reasons = self.low_memory_blockers(**settings)
            if reasons:
                why = "; ".join(reasons)
                warnings.warn(
                    f"ID3Config(low_memory=True) cannot apply with {why}. Falling back to the standard mode: "
                    "the same selection, but dense gradients are kept until the optimizer step.",
                    stacklevel=2,
                )
                self.low_memory = False
        return self.low_memory

    @property
    def low_memory_active(self) -> bool:
        """True while the low-memory gradient hooks are installed (from `start` on)."""
        return bool(self._hooks)

    def _method_score_fn(self) -> ScoreFn | None:
        score_fn = getattr(self.method, "score_fn", None)
        return score_fn() if callable(score_fn) and self.method.incremental else None

    def _install_hooks(self) -> None:
        if self._hooks:
            return
        for name, p in self.unmasked.params.items():
            self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))

    def remove_hooks(self) -> None:
        """Uninstall the low-memory gradient hooks and the row-sparse embedding hooks, so later backwards
        leave `p.grad` alone and dense, and turn pointwise recomputation off (the Trainer does this at train
        end; `start` puts them back)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._pass = [], None
        if self._sparse_hooks is not None:
            self._sparse_hooks.remove()
            self._sparse_hooks = None
        if self._tied_streams is not None:
            self._tied_streams.remove()
            self._tied_streams = None
        if self._recompute is not None:
            self._recompute.remove()
            self._recompute = None

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if not torch.is_grad_enabled():  # the usual case inside backward: skip the context manager
                return self._on_grad_ready(name, p)
            with torch.no_grad():
                self._on_grad_ready(name, p)

        return hook

    def _current_pass(self) -> _LowMemoryPass:
        """The low-memory scoring of the backward in progress (begun by the first gradient to arrive)."""
        if self._pass is None:
            if self.schedule is None:
                raise RuntimeError("call engine.start(total_steps) before the first backward.")
            k = self.schedule.target(self.steps_done + 1) - len(self.unmasked)
            scorer = TensorScorer(self._method_score_fn(), keep_grads=True, buffer=self._score_buffer)
            self._pass = _LowMemoryPass(k, StreamingTopK(k), scorer)
            self.unmasked.grad_stash.clear()
        return self._pass

    def _on_output_rows(
        self, name: str, first_row: int, block: torch.Tensor, token_rows: torch.Tensor
    ) -> None:
        """Low-memory mode, tied table `name`: rows [first_row, first_row + len(block)) of its output layer's
        gradient, final except `token_rows` (block-local), which the embedding adds to and `p.grad` brings
        later. Scores the final rows and keeps the values of unmasked entries among them."""
        lm = self._current_pass()
        p, excluded = self.unmasked.params[name], self._sorted_unmasked(name)
        width = block.shape[1]
        lo, hi = first_row * width, (first_row + block.shape[0]) * width
        if name not in lm.streamed:
            idx = self.unmasked.indices[name]
            lm.streamed[name] = (block.new_zeros(idx.numel()), torch.argsort(idx))
        kept, order = lm.streamed[name]
        a, b = torch.searchsorted(excluded, torch.tensor([lo, hi], device=excluded.device)).tolist()
        skip = excluded[a:b] - lo  # the unmasked entries in this block, block-local
        if b > a:
            kept[order[a:b]] = block.view(-1)[skip]
        if lm.k <= 0:
            return
        if token_rows.numel():  # their score waits for the embedding's rows: ineligible here
            cols = torch.arange(width, device=token_rows.device)
            skip = torch.unique(torch.cat([skip, (token_rows[:, None] * width + cols).view(-1)]))
        rows = p.detach()[first_row : first_row + block.shape[0]]
        lm.scorer.push_flat(lm.top, block, rows, self._offsets[name] + lo, skip)

    def _on_grad_ready(self, name: str, p: torch.Tensor) -> None:
        """Low-memory mode, as backward completes `p.grad`: score it into the running top-k (each candidate
        keeps its gradient value), stash the gradient values of the unmasked entries, and free the gradient."""
        lm = self._current_pass()
        if name in lm.seen:
            raise RuntimeError(
                f"low_memory=True: {name} received a second gradient before engine.step(). This mode needs "
                "exactly one backward per step (no gradient accumulation); set ID3Config(low_memory=False)."
            )
        lm.seen.add(name)
        grad = as_coalesced(p.grad) if p.grad.is_sparse else p.grad
        if name in lm.streamed:
            self._finish_streamed(lm, name, p, grad)
            return
        if lm.k > 0:
            if p.numel() < SMALL_TENSOR and not grad.is_sparse:
                lm.small.append((name, grad))  # small: kept until the end of backward, scored together
            else:
                if lm.small and not lm.top.full:  # the head's small tensors first: they set the bar early
                    self._push_small(lm.top, lm.scorer, lm.small)
                    lm.small = []
                self._push_tensor(lm.top, lm.scorer, name, grad, lm.pending)
        idx = self.unmasked.indices[name]
        self.unmasked.grad_stash[name] = gather_entries(grad, idx) if idx.numel() else p.new_empty(0)
        p.grad = None

    def _finish_streamed(self, lm: _LowMemoryPass, name: str, p: torch.Tensor, grad: torch.Tensor) -> None:
        """A streamed tied table's `p.grad`: the token rows, the only ones not scored yet (see `_on_output_rows`)."""
        if not grad.is_sparse:
            raise RuntimeError(
                f"{name}: a use other than its embedding and output layer added a dense gradient, after the "
                "output layer's rows were already scored as final. Set ID3Config(sparse_embedding_grads=False) "
                "for this model."
            )
        rows, block = coalesced_rows(grad)
        if lm.k > 0:
            offset, excluded = self._offsets[name], self._sorted_unmasked(name)
            lm.scorer.push_row_block(lm.top, block, p, offset, rows, excluded)  # no zero rows owed
        (kept, _), idx = lm.streamed.pop(name), self.unmasked.indices[name]
        pos, col, hit = locate(rows, block.shape[1], idx)
        kept[hit] = block[pos[hit], col[hit]]
        self.unmasked.grad_stash[name] = kept.to(p.dtype)
        p.grad = None

    def _finish_low_memory_pass(self, k: int) -> bool:
        """Low-memory counterpart of `method.on_step(k)`: unmask the winners, stash their gradient values."""
        lm, self._pass = self._pass, None
        if self._tied_streams is not None:
            self._tied_streams.reset()
        if lm is not None and lm.streamed:  # a backward that never reached these tables' `p.grad`
            raise RuntimeError(
                f"low_memory: the gradient of {sorted(lm.streamed)} never completed before step()."
            )
        if lm is None or k <= 0:
            return True
        self._score_buffer = lm.scorer.buffer
        if k > lm.k:
            warnings.warn(f"low_memory: asked for {k} entries, backward kept {lm.k}.", stacklevel=2)
        self._push_small(lm.top, lm.scorer, lm.small)
        self._push_skipped_rows(lm.top, lm.scorer, lm.pending)
        if not lm.scorer.finite and self.current_check_overflow:
            return False
        values, index = lm.top.result()
        grads = lm.top.result_payload()
        self.last_selected_scores = values[:k].detach().cpu()
        if grads is None:
            return True
        index, grads = index[:k], grads[:k]
        order = torch.argsort(index)  # the order `add_global` adds them in: by global index
        index, grads = index[order], grads[order]
        starts = torch.tensor(list(self._offsets.values()), dtype=index.dtype, device=index.device)
        cuts = torch.searchsorted(index, starts).tolist() + [index.numel()]
        for (name, offset), lo, hi in zip(self._offsets.items(), cuts, cuts[1:]):
            if hi > lo:
                self.unmasked.add(name, index[lo:hi] - offset)
                kept = self.unmasked.grad_stash.get(name)
                new = grads[lo:hi].to(self.unmasked.params[name].dtype)
                self.unmasked.grad_stash[name] = (
                    new if kept is None else torch.cat([kept, new.to(kept.dtype)])
                )
        return True

    def grad_norm(self) -> torch.Tensor:
        """L2 norm of the model's gradients as the optimizer sees them (masked entries count as 0).

        O(B) for selectable tensors: it reads only unmasked entries (from `p.grad` or the low-memory stash).
        """
        return self._norm(self._optimizer_grads())

    def _optimizer_grads(self) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """(parameter, its unmasked indices or None for all of it, the gradient values the optimizer reads)
        for every parameter with any: the unmasked entries of `p.grad` (a copy), the low-memory mode's kept
        values (the stash tensor itself), or the whole `p.grad` (a row-sparse one: its values)."""
        selectable = {id(p): name for name, p in self.unmasked.params.items()}
        out = []
        for p in self.model.parameters():
            name = selectable.get(id(p))
            idx = None if name is None else self.unmasked.indices_for(p)
            if idx is None:
                values = None if p.grad is None else p.grad.detach()
                if values is not None and values.is_sparse:
                    values = values.coalesce().values()
            elif p.grad is not None:
                values = gather_entries(p.grad.detach(), idx)
            else:
                values = self.unmasked.grad_stash.get(name)
            if values is not None and values.numel():
                out.append((p, idx, values))
        return out

    @staticmethod
    def _norm(grads: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
        if not grads:
            return torch.zeros(())
        norms = [torch.linalg.vector_norm(values.float()) for _, _, values in grads]
        # Like torch's clip_grad_norm_: the norm of the per-tensor norms.
        return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))

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

    def budget_shortfall(self) -> str | None:
        """Why the set holds fewer than the budget's entries (None when it holds them all), for a warning."""
        if len(self.unmasked) >= self.budget:
            return None
        total = self.schedule.total_steps if self.schedule is not None else "?"
        return (
            f"ID3 ended with {len(self.unmasked):,} of its budget of {self.budget:,} entries unmasked after "
            f"{self.steps_done:,} of {total} optimizer steps; {self.skipped_steps:,} steps grew nothing (an fp16 "
            "overflow, or no finite score: NaN/Inf gradients). Train to max_steps, or look for NaN/Inf losses; "
            "the delta holds only the entries unmasked."
        )

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        total_steps = self.schedule.total_steps if self.schedule is not None else self.resumed_total_steps
        return {
            "format": state_io.FORMAT,
            "global_step": self.steps_done,
            "fingerprint": state_io.fingerprint(self, total_steps),
            "config": self.config.to_dict(),
            "budget": self.budget,
            "steps_done": self.steps_done,
            "updates_total": self.updates_total,
            "skipped_steps": self.skipped_steps,
            "unmasked": self.unmasked.state_dict(),
            "method": self.method.state_dict(),
        }

    def load_state_dict(
        self,
        state: dict,
        source: str = "the state dict",
        global_step: int | None = None,
        total_steps: int | None = None,
    ) -> None:
        """Load a state from `state_dict`, after `state.verify` (raises `StateError`, loading nothing)."""
        if not isinstance(state, dict) or state.get("format") not in (
            state_io.FORMAT,
            state_io.LEGACY_FORMAT,
        ):
            raise state_io.StateError(f"{source} is not an ID3 engine state (missing format tag).")
        state_io.verify(state, self, source, global_step, total_steps)
        self.unmasked.load_state_dict(state["unmasked"])
        self.steps_done = state["steps_done"]
        self.updates_total = state["updates_total"]
        self.skipped_steps = state["skipped_steps"]
        self.method.load_state_dict(state["method"])
        self.resumed_total_steps = state.get("fingerprint", {}).get("total_steps")

    def save(self, directory: str | os.PathLike) -> str:
        """Write the state into `directory` atomically (temp file + rename) and fsynced; returns the file path."""
        path = os.path.join(directory, STATE_FILE)
        return state_io.write_durably(path, state_io.encode(self.state_dict()))

    def load(
        self, directory: str | os.PathLike, global_step: int | None = None, total_steps: int | None = None
    ) -> None:
        """Load the state `save` wrote, verified first (`state.verify`): checksum, settings, indices, and the
        step when `global_step` is given. Raises `StateError` and loads nothing if any check fails."""
        path = os.path.join(os.fspath(directory), STATE_FILE)
        self.load_state_dict(state_io.read_state(path), path, global_step, total_steps)


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
