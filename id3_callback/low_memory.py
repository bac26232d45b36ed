"""Low-memory mode (`ID3Config.low_memory`): score each gradient inside backward, keep O(B + k), free it.

As backward completes a selectable tensor's `p.grad`, a post-accumulate hook scores it into one running
top-k whose candidates carry their gradient value, keeps the gradient values of the entries already in the
set (`UnmaskedSet.grad_stash`, which `SparseAdamW` reads), and frees the gradient: dense gradients never
coexist. A table tied to the output layer (`TiedOutputStreams`) is scored in blocks as the output layer's
backward computes them, and never built whole. `ID3Engine.step` then calls `finish`, which returns the
step's `Selection` (with the winners' gradient values) for the engine to apply.

Example (the engine builds it at `start` when the plan says so):
    >>> engine = ID3Engine(model, ID3Config(budget=1000, low_memory=True))  # doctest: +SKIP
    >>> engine.start(100); loss.backward(); engine.step()                   # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from . import selection
from .masks import UnmaskedSet
from .methods.base import Selection
from .scan import Scan, ScoreFn
from .selection import StreamingTopK, TensorScorer
from .sparse_grads import TiedOutputStreams, as_coalesced, coalesced_rows, gather_entries, locate


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


class LowMemoryMode:
    """The gradient hooks of low-memory mode and the backward being scored.

    `entries_wanted()` gives the step's k when its first gradient arrives (the engine's schedule count);
    `tied_tables` (name -> (embedding modules, output layer)) are streamed when given.
    """

    def __init__(
        self,
        unmasked: UnmaskedSet,
        scan: Scan,
        score_fn: ScoreFn,
        entries_wanted: Callable[[], int],
        tied_tables: Mapping[str, tuple] | None = None,
    ) -> None:
        self.unmasked, self.scan, self.score_fn, self.entries_wanted = (
            unmasked,
            scan,
            score_fn,
            entries_wanted,
        )
        self.current: _LowMemoryPass | None = None
        self.hooks = [
            p.register_post_accumulate_grad_hook(self._grad_hook(n)) for n, p in unmasked.params.items()
        ]
        # One block of the output layer's gradient: about a score chunk (4 MiB).
        self.streams = (
            TiedOutputStreams(dict(tied_tables), self._on_output_rows, selection.SCORE_CHUNK)
            if tied_tables
            else None
        )
        scan.allocate_buffer()

    @property
    def streamed_tables(self) -> list[str]:
        return list(self.streams.tables) if self.streams is not None else []

    def remove(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks, self.current = [], None
        if self.streams is not None:
            self.streams.remove()
            self.streams = None

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if not torch.is_grad_enabled():  # the usual case inside backward: skip the context manager
                return self._on_grad_ready(name, p)
            with torch.no_grad():
                self._on_grad_ready(name, p)

        return hook

    def _current_pass(self) -> _LowMemoryPass:
        """The low-memory scoring of the backward in progress (begun by the first gradient to arrive)."""
        if self.current is None:
            k = self.entries_wanted()
            scorer = self.scan.scorer(self.score_fn, keep_grads=True)
            self.current = _LowMemoryPass(k, StreamingTopK(k), scorer)
            self.unmasked.grad_stash.clear()
        return self.current

    def _on_output_rows(
        self, name: str, first_row: int, block: torch.Tensor, token_rows: torch.Tensor
    ) -> None:
        """Tied table `name`: rows [first_row, first_row + len(block)) of its output layer's gradient, final
        except `token_rows` (block-local), which the embedding adds to and `p.grad` brings later. Scores the
        final rows and keeps the values of unmasked entries among them."""
        lm = self._current_pass()
        p, excluded = self.unmasked.params[name], self.scan.sorted_unmasked(name)
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
        lm.scorer.push_flat(lm.top, block, rows, self.scan.offsets[name] + lo, skip)

    def _on_grad_ready(self, name: str, p: torch.Tensor) -> None:
        """As backward completes `p.grad`: score it into the running top-k (each candidate keeps its gradient
        value), stash the gradient values of the unmasked entries, and free the gradient."""
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
            if p.numel() < selection.SMALL_TENSOR and not grad.is_sparse:
                lm.small.append((name, grad))  # small: kept until the end of backward, scored together
            else:
                if lm.small and not lm.top.full:  # the head's small tensors first: they set the bar early
                    self.scan.push_small(lm.top, lm.scorer, lm.small)
                    lm.small = []
                self.scan.push_tensor(lm.top, lm.scorer, name, grad, lm.pending, record_rows=False)
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
            offset, excluded = self.scan.offsets[name], self.scan.sorted_unmasked(name)
            lm.scorer.push_row_block(lm.top, block, p, offset, rows, excluded)  # no zero rows owed
        (kept, _), idx = lm.streamed.pop(name), self.unmasked.indices[name]
        pos, col, hit = locate(rows, block.shape[1], idx)
        kept[hit] = block[pos[hit], col[hit]]
        self.unmasked.grad_stash[name] = kept.to(p.dtype)
        p.grad = None

    def finish(self, k: int) -> Selection | None:
        """End the step's pass: the k winners with their gradient values (None: nothing to add). The scan's
        `finite` says whether every score was finite."""
        lm, self.current = self.current, None
        if self.streams is not None:
            self.streams.reset()
        if lm is not None and lm.streamed:  # a backward that never reached these tables' `p.grad`
            raise RuntimeError(
                f"low_memory: the gradient of {sorted(lm.streamed)} never completed before step()."
            )
        if lm is None or k <= 0:
            return None
        if k > lm.k:
            warnings.warn(f"low_memory: asked for {k} entries, backward kept {lm.k}.", stacklevel=3)
        self.scan.push_small(lm.top, lm.scorer, lm.small)
        self.scan.push_skipped_rows(lm.top, lm.scorer, lm.pending)
        self.scan.keep_buffer(lm.scorer)
        values, index = lm.top.result()
        grads = lm.top.result_payload()
        if grads is None:
            return Selection(scores=values[:k])
        return Selection(index[:k], values[:k], grads=grads[:k])
