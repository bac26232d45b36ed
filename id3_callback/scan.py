"""The scan: every way of scoring selectable entries into a `StreamingTopK`, at their global indices.

One object per engine, used by every selection method, by `repeat`, by the calibration methods (scores of
weights or Fisher sums) and by the low-memory hooks. It owns what makes scoring fast across steps: each
tensor's global offset, its sorted unmasked indices (cached per index tensor), last step's peak scores (the
likely winners are pushed first), the D3 score buffer, and which embedding gradients are checked for zero
rows. Results never depend on any of these: they equal `torch.cat(all scores).topk(k)` with the lower global
index winning ties (see `selection`).

Example:
    >>> values, index = engine.scan.top_by_gradient(10, partial(d3_scores, eps=1e-3, exp=1.0))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from . import selection
from .batched_topk import Segment, concatenated, top_d3
from .masks import UnmaskedSet
from .scores import d3_settings
from .selection import INELIGIBLE, StreamingTopK, TensorScorer, nonzero_rows
from .sparse_grads import as_coalesced, coalesced_rows

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: score(name, param, start, stop) -> float32 scores of flat entries [start, stop) of `param`, a fresh tensor.
ChunkScore = Callable[[str, torch.Tensor, int, int], torch.Tensor]


def split_global(
    index: torch.Tensor, offsets: Mapping[str, int], values: torch.Tensor | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Global flat indices (distinct) -> {tensor name: (its sorted local indices, `values` in that order)}.

    Every tensor of `offsets` gets an entry (empty when nothing falls in it); `values`, if given, are aligned
    with `index` and travel with it.

    Example:
        >>> out = split_global(torch.tensor([5, 0, 3]), {"a": 0, "b": 3})
        >>> out["a"][0].tolist(), out["b"][0].tolist()
        ([0], [0, 2])
    """
    order = torch.argsort(index)
    index = index[order]
    values = None if values is None else values[order]
    starts = torch.tensor(list(offsets.values()), dtype=index.dtype, device=index.device)
    cuts = torch.searchsorted(index, starts).tolist() + [index.numel()]
    return {
        name: (index[lo:hi] - offset, None if values is None else values[lo:hi])
        for (name, offset), lo, hi in zip(offsets.items(), cuts, cuts[1:])
    }


class Scan:
    """Scores the selectable tensors of `unmasked` (global offsets `offsets`) into top-k selections.

    `finite` is False once a gradient score of the current step was Inf/NaN (fp16 overflow); the engine
    resets it each step (`begin_step`) and skips a step's selection when it must check overflow.
    """

    def __init__(self, unmasked: UnmaskedSet, offsets: Mapping[str, int], row_sparse: frozenset[str]) -> None:
        self.unmasked = unmasked
        self.offsets = offsets
        self.total = sum(p.numel() for p in unmasked.params.values())
        self.finite = True
        self.buffer: torch.Tensor | None = None  # D3 scratch (a few MiB), kept across steps
        self._sorted_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Each tensor's best score at the last step: scoring the likely winners first raises the top-k's
        # threshold early, so later chunks are dropped after one max (the result does not depend on order).
        self._peaks: dict[str, float] = {}
        # Embedding weights whose gradient rows are checked for zeros (dropped once one comes out dense).
        self.row_sparse = set(row_sparse)
        # Row-sparse gradients scored this step: name -> (the gradient, its rows holding any nonzero bit).
        self.nonzero_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # weight_grads='bounded': the layers whose masked entries backward scored already (`bounded.py`).
        self.bounded = None  # a bounded.BoundedGrads, set by the engine's start()

    def begin_step(self) -> None:
        self.finite = True
        self.nonzero_rows = {}  # filled by this step's scoring, for this step's gradients only

    def scorer(
        self, score_fn: ScoreFn | None, grad_scale: float = 1.0, keep_grads: bool = False
    ) -> TensorScorer:
        """A `TensorScorer` writing into this scan's reused buffer (hand it back with `keep_buffer`)."""
        return TensorScorer(score_fn, grad_scale, keep_grads=keep_grads, buffer=self.buffer)

    def keep_buffer(self, scorer: TensorScorer) -> None:
        self.buffer = scorer.buffer
        self.finite = self.finite and scorer.finite

    def allocate_buffer(self) -> None:
        """Allocate the D3 buffer now (low-memory mode calls it at `start`): a block that lives on, placed
        among activations that are about to be freed inside the first backward, would fragment the heap."""
        if self.buffer is None and self.unmasked.params:
            device = next(iter(self.unmasked.params.values())).device
            self.buffer = torch.empty(selection.SCORE_CHUNK, dtype=torch.float32, device=device)

    # ------------------------------------------------------------------------------ gradients of masked entries
    def push_scores(self, top: StreamingTopK, score_fn: ScoreFn, grad_scale: float = 1.0) -> bool:
        """Push every selectable entry's score into `top`, tensor by tensor, chunk by chunk.

        Already-unmasked entries and non-finite scores are ineligible; tensors without a gradient are
        skipped. Returns False if a non-finite score was seen (fp16 overflow). The result equals scoring
        everything, concatenating and taking the top-k; see `TensorScorer` for the shortcuts.
        """
        final = top
        if self.bounded is not None:
            # Into the pass's top-k, which already holds the bounded layers' verified entries.
            bp = self.bounded.current_pass()
            if bp.k != top.k:
                raise RuntimeError(
                    f"weight_grads='bounded': backward scored for k={bp.k}, step() asks for {top.k} (the set "
                    "changed between backward and step?)."
                )
            top, scorer = bp.top, bp.scorer
        else:
            d3 = d3_settings(score_fn)
            if (
                d3 is not None
                and top.k > 0
                and top.values.numel() == 0
                and not top._pending
                and self.batched()
            ):
                return self._push_scores_batched(top, score_fn, d3, grad_scale)
            scorer = self.scorer(score_fn, grad_scale)
        pending: list[tuple[str, int, torch.Tensor]] = []
        small, big = [], []
        for name, p in self.unmasked.params.items():
            if p.grad is not None:
                if p.grad.is_sparse:  # summed once here: masking and the optimizer then read the same rows
                    p.grad = as_coalesced(p.grad)
                small_tensor = p.numel() < selection.SMALL_TENSOR and not p.grad.is_sparse
                (small if small_tensor else big).append((name, p.grad))
        self.push_small(top, scorer, small)
        # Last step's best-scoring tensors first; ties (and the first step) in global order, which also lets
        # chunks that only tie the k-th score be dropped when they come after it.
        big.sort(key=lambda item: (-self._peaks.get(item[0], -math.inf), self.offsets[item[0]]))
        for name, grad in big:
            self.push_tensor(top, scorer, name, grad, pending)
        if final is not top:
            self.bounded.certify(top)  # every tensor is in: re-score what the final cut did not certify
        self.push_skipped_rows(top, scorer, pending)
        if final is not top:
            values, index = top.result()
            final.push_candidates(values, index)
            self.keep_buffer(scorer)
            return scorer.finite
        top.offset = self.total
        self.keep_buffer(scorer)
        return scorer.finite

    def batched(self) -> bool:
        """Whether D3 selections run batched here (see `selection.BATCHED_SELECTION`)."""
        mode = selection.BATCHED_SELECTION
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"selection.BATCHED_SELECTION must be 'auto', 'always' or 'never', not {mode!r}")
        if mode == "auto":
            return any(p.device.type != "cpu" for p in self.unmasked.params.values())
        return mode == "always"

    def _push_scores_batched(
        self, top: StreamingTopK, score_fn: ScoreFn, d3: tuple[float, float], grad_scale: float
    ) -> bool:
        """`push_scores` for D3 into an empty `top`: every dense gradient at once (`batched_topk.top_d3`, a
        constant number of host reads however many tensors and chunks), then the row-sparse ones as before
        (a few reads per embedding table)."""
        segments, small, rows = [], [], []
        for name, p in self.unmasked.params.items():
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:  # summed once here: masking and the optimizer then read the same rows
                p.grad = grad = as_coalesced(grad)
            if grad.is_sparse or name in self.row_sparse:
                rows.append((name, grad))
            elif p.numel() < selection.SMALL_TENSOR:
                small.append((name, grad))
            else:
                flat = p.detach().reshape(-1)
                segments.append(
                    Segment(grad.detach().reshape(-1), flat, self.offsets[name], self.sorted_unmasked(name))
                )
        if small:
            names = [name for name, _ in small]
            segments.append(
                concatenated(
                    [grad for _, grad in small],
                    [self.unmasked.params[name] for name in names],
                    [self.offsets[name] for name in names],
                    [self.sorted_unmasked(name) for name in names],
                )
            )
        if segments and (self.buffer is None or self.buffer.numel() <= selection.SCORE_CHUNK):
            self.buffer = torch.empty(
                selection.SCORE_CHUNK + 1, dtype=torch.float32, device=segments[0].grad.device
            )
        values, index, finite, kth = top_d3(segments, top.k, *d3, grad_scale, self.buffer)
        top.hold(values, index, kth)
        scorer = self.scorer(score_fn, grad_scale)
        pending: list[tuple[str, int, torch.Tensor]] = []
        for name, grad in rows:
            self.push_tensor(top, scorer, name, grad, pending)
        self.push_skipped_rows(top, scorer, pending)
        top.offset = self.total
        scorer.finite = scorer.finite and finite
        self.keep_buffer(scorer)
        return scorer.finite

    def top_by_gradient(
        self, k: int, score_fn: ScoreFn, grad_scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, global indices) of the k best still-masked entries on the current gradients."""
        top = StreamingTopK(k)
        self.push_scores(top, score_fn, grad_scale)
        return top.result()

    def top_of_every_entry(self, k: int, score_fn: ScoreFn) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, global indices) of the k best entries, unmasked ones included (repeat-S); a tensor
        without a gradient counts as zero gradients. Every `p.grad` is read dense."""
        top = StreamingTopK(k)
        scorer = self.scorer(score_fn)
        nothing = torch.empty(0, dtype=torch.long)
        for name, p in self.unmasked.params.items():
            scorer.push_flat(top, p.grad, p, self.offsets[name], nothing.to(p.device))
        self.keep_buffer(scorer)
        return top.result()

    def push_tensor(
        self,
        top: StreamingTopK,
        scorer: TensorScorer,
        name: str,
        grad: torch.Tensor,
        pending: list,
        record_rows: bool = True,
    ) -> None:
        """Push one tensor's gradient (dense or row-sparse). Rows skipped as all-zero go to `pending`, owed to
        `push_skipped_rows`; with `record_rows` they are kept so masking zeroes only those rows."""
        p, offset, excluded = self.unmasked.params[name], self.offsets[name], self.sorted_unmasked(name)
        if grad.is_sparse:  # a row-sparse gradient: its rows are given, every other row is exactly zero
            if scorer.zero_grad_scores_zero:
                rows, block = coalesced_rows(grad)
                self._peaks[name] = scorer.push_row_block(top, block, p, offset, rows, excluded)
                pending.append((name, offset, rows))
                return
            grad = grad.to_dense()  # a score that is not 0 at zero gradient must see every row
        if scorer.zero_grad_scores_zero and name in self.row_sparse:
            rows = nonzero_rows(grad)
            if rows is not None:
                self._peaks[name] = scorer.push_rows(top, grad, p, offset, rows, excluded)
                pending.append((name, offset, rows))
                if record_rows:  # low-memory mode frees the gradient: nothing to mask
                    self.nonzero_rows[name] = (grad, rows)
                return
            self.row_sparse.discard(name)  # dense (e.g. tied to the output layer): stop checking it
        self._peaks[name] = scorer.push_flat(top, grad, p, offset, excluded)

    def push_small(self, top: StreamingTopK, scorer: TensorScorer, small: list) -> None:
        """Push (name, gradient) pairs of small tensors together."""
        names = [name for name, _ in small]
        scorer.push_many(
            top,
            [grad for _, grad in small],
            [self.unmasked.params[name] for name in names],
            [self.offsets[name] for name in names],
            [self.sorted_unmasked(name) for name in names],
        )

    def push_skipped_rows(self, top: StreamingTopK, scorer: TensorScorer, pending: list) -> None:
        """Rows skipped by `push_rows` score 0, so they matter only when fewer than k scores are positive."""
        if pending and (not top.full or top.threshold() <= 0.0):
            for name, offset, rows in pending:
                p = self.unmasked.params[name]
                scorer.push_zero_rows(top, p, offset, rows, self.sorted_unmasked(name))

    def sorted_unmasked(self, name: str) -> torch.Tensor:
        """Sorted unmasked indices of `name`, cached until the set's index tensor is replaced."""
        idx = self.unmasked.indices[name]
        cached = self._sorted_cache.get(name)
        if cached is None or cached[0] is not idx:
            cached = self._sorted_cache[name] = (idx, torch.sort(idx).values)
        return cached[1]

    # ---------------------------------------------------------------------------- any score, chunk by chunk
    def top_entries(self, k: int, score: ChunkScore) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The k best masked entries under `score` (weights, Fisher sums, ...): (scores, global indices, all
        scores finite). Non-finite scores are ineligible, and so are entries already in the set.

        Example:
            >>> scan.top_entries(10, lambda n, p, a, b: p.detach().reshape(-1)[a:b].abs().neg())  # doctest: +SKIP
        """
        top = StreamingTopK(k)
        finite = True
        for name, p in self.unmasked.params.items():
            n = p.numel()
            if name in self.unmasked.full:
                top.offset += n
                continue
            idx = self.unmasked.indices[name]
            for start in range(0, n, selection.CHUNK):
                stop = min(start + selection.CHUNK, n)
                scores = score(name, p, start, stop)
                if not bool(torch.isfinite(scores).all()):
                    finite = False
                    torch.nan_to_num_(scores, nan=INELIGIBLE, posinf=INELIGIBLE, neginf=INELIGIBLE)
                if idx.numel():
                    local = idx[(idx >= start) & (idx < stop)] - start
                    scores.index_fill_(0, local, INELIGIBLE)
                top.push(scores)
        values, index = top.result()
        return values, index, finite

    def split_global(
        self, index: torch.Tensor, values: torch.Tensor | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """`split_global` over this scan's tensors."""
        return split_global(index, self.offsets, values)


def weight_chunk(p: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Flat entries [start, stop) of `p`'s weights (a view): the input of weight-only scores."""
    return p.detach().reshape(-1)[start:stop]
