"""Exact global top-k over many score tensors without ever concatenating them.

Order: higher score first; among equal scores the lower *global* flat index wins (selectable tensors
concatenated in registration order, then flat position), so the result equals `torch.cat(all).topk(k)` with
deterministic ties, whatever order the chunks arrive in (each is pushed at its global offset).
Scores of -inf mark ineligible entries (already unmasked, NaN/Inf gradients) and are never chosen.
`TensorScorer` feeds it from gradients and weights with the fast paths measured in docs/performance.md.

Memory: the running best-k buffer plus one chunk's candidates, O(k + chunk), independent of the total size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .scores import d3_scores, d3_settings
from .sparse_grads import locate

INELIGIBLE = float("-inf")
# Score tensors are processed in slices of this many entries, so temporaries stay bounded for huge tensors.
CHUNK = 1 << 22
# D3 scores are computed this many entries at a time into one reused float32 buffer (4 MiB): the abs / add /
# div / max passes then run in cache, and no tensor-sized temporary is allocated (fresh large allocations
# page-fault on every step). Measured on 2 cores: 1M entries per chunk beat 256K and 64K (fewer op calls).
SCORE_CHUNK = 1 << 20
# Finding the few entries at or above a threshold: `x >= t` and `nonzero` cost ~10x an elementwise pass on CPU
# (590K entries: ge 280 us, nonzero 480 us, against 40 us for a max over rows), so entries are grouped in
# blocks of this many, one row-wise max finds the blocks that reach the threshold, and only those are compared.
BLOCK = 128
# The batched selection (`batched_topk`) bounds gradients per block of this many entries (512: fewer, wider
# bounds, but 2x the entries scored on MiniLM; 128 measured faster).
BOUND_BLOCK = 128
# Where the D3 selection runs batched (`batched_topk`: three host reads per step, however many tensors and
# chunks) instead of streaming chunk by chunk (a host read or more per chunk): "auto" = on every device but
# the CPU, where host reads cost nothing and streaming measured ~1.5x faster (MiniLM, 1 thread); "always";
# "never".
BATCHED_SELECTION = "auto"
# Intra-op threads of a step's selection (None: torch's setting). Its ops are many and small, each an OpenMP
# parallel region whose barrier waits for the slowest thread; when other jobs share the CPU that thread is
# often descheduled, and the selection slowed 45x where the backward slowed 12x (issue 20). One thread costs
# little idle and removes the barrier: benchmarks/results/contention.md.
SELECTION_THREADS: int | None = 1
# Past this fraction of entries in reaching blocks, gathering them costs more than working on the whole chunk.
FEW = 0.25
# Tensors smaller than this (biases, norms) are scored together: per-tensor op overhead would dominate.
SMALL_TENSOR = 1 << 14
# Embedding weights at least this large get the row-sparse D3 path (smaller ones are cheap to score whole).
ROW_SPARSE_MIN_ENTRIES = 1 << 16
# Linear weights at least this large get bounded weight gradients (ID3Config.weight_grads='bounded').
BOUNDED_MIN_ENTRIES = 1 << 16
# Every size above is read as `selection.NAME` at the time of use, so patching it here reaches every user.


@contextmanager
def selection_threads() -> Iterator[None]:
    """Run the block with `SELECTION_THREADS` intra-op threads (restored after; a no-op for None)."""
    wanted, before = SELECTION_THREADS, torch.get_num_threads()
    if wanted is None or wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of a 1-D chunk under (score desc, index asc), eligible entries only."""
    n = scores.numel()
    if k >= n:
        idx = torch.arange(n, device=scores.device)
        keep = scores > INELIGIBLE
        return scores[keep], idx[keep]
    # k+1 values tell whether the boundary is tied: if not, torch's (arbitrary) tie order cannot matter.
    vals, idx = torch.topk(scores, k + 1, sorted=True)
    kth, nxt = vals[k - 1], vals[k]
    if kth == INELIGIBLE:
        keep = vals[:k] > INELIGIBLE
        return vals[:k][keep], idx[:k][keep]
    if kth > nxt:
        return vals[:k], idx[:k]
    # Tie at the boundary: take everything strictly above it, then the lowest indices equal to it.
    above = vals > kth
    vals_above, idx_above = vals[above], idx[above]
    need = k - vals_above.numel()
    tied = []
    for start in range(0, n, CHUNK):
        hits = (scores[start : start + CHUNK] == kth).nonzero().view(-1)[:need] + start
        tied.append(hits)
        need -= hits.numel()
        if need == 0:
            break
    tied_idx = torch.cat(tied)
    return torch.cat([vals_above, kth.expand(tied_idx.numel())]), torch.cat([idx_above, tied_idx])


def _first_equal(scores: torch.Tensor, value: torch.Tensor, limit: int) -> torch.Tensor:
    """Positions of the first `limit` entries equal to `value`, scanning blocks of growing size."""
    found, need, start, block = [], limit, 0, max(4 * limit, 4096)
    while need > 0 and start < scores.numel():
        hits = (scores[start : start + block] == value).nonzero().view(-1)[:need] + start
        found.append(hits)
        need -= hits.numel()
        start, block = start + block, block * 4
    return torch.cat(found) if found else torch.empty(0, dtype=torch.long, device=scores.device)


def at_least(values: torch.Tensor, cut: float, negative: bool = False) -> torch.Tensor | None:
    """Sorted positions of the entries of 1-D `values` that are >= cut (with `negative`: <= -cut), or None
    if the `BLOCK`-sized blocks holding them make up over `FEW` of `values` (then compare them all directly).

    Same answer as `(values >= cut).nonzero()`, but one row-wise max finds the blocks that reach the cut and
    only those are compared.

    Example:
        >>> at_least(torch.cat([torch.zeros(300), torch.ones(1)]), 0.5).tolist()
        [300]
    """
    n = values.numel()
    whole = n // BLOCK * BLOCK
    rows = values[:whole].view(-1, BLOCK)
    hot = ((rows.amin(1) <= -cut) if negative else (rows.amax(1) >= cut)).nonzero().view(-1)
    if hot.numel() * BLOCK + n - whole > FEW * n:
        return None
    block = rows.index_select(0, hot)
    row, column = ((block <= -cut) if negative else (block >= cut)).nonzero().unbind(1)
    found = hot[row] * BLOCK + column
    if whole < n:
        tail = values[whole:]
        found = torch.cat([found, ((tail <= -cut) if negative else (tail >= cut)).nonzero().view(-1) + whole])
    return found


def _order(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Permutation sorting by (value desc, index asc)."""
    by_index = torch.argsort(index, stable=True)
    by_value = torch.argsort(values[by_index], descending=True, stable=True)
    return by_index[by_value]


class StreamingTopK:
    """Feed score chunks (in any order, at their global offsets), then read the k best (value, index) pairs.

    Once k entries are held, a chunk whose maximum is below the k-th best value is skipped after one read,
    and only entries >= that value are extracted from the others: most chunks cost a max, not a top-k.

    Example:
        >>> top = StreamingTopK(2)
        >>> top.push(torch.tensor([0.5, 2.0]))
        >>> top.push(torch.tensor([2.0, 1.0]))
        >>> top.result()[1].tolist()   # the two 2.0s, lower index first
        [1, 2]
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.offset = 0
        self.values = torch.empty(0)
        self.index = torch.empty(0, dtype=torch.long)
        self.payload: torch.Tensor | None = None
        # Once k entries are held, candidates wait here and are merged (one sort) when k of them have piled
        # up: merging after every chunk sorted k + c entries per chunk, seconds per step at k ~ 57K. Until
        # then `values[-1]` is a stale k-th value: lower than the true one, so it still filters exactly.
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._pending_count = 0
        self._with_payload: bool | None = None  # set by the first push that holds entries

    @property
    def full(self) -> bool:
        """True once k entries are held (from then on the k-th best value filters new chunks)."""
        return self.k > 0 and self.values.numel() >= self.k

    @property
    def kth(self) -> float:
        """The k-th best value held (once `full`): a host float, cached at each merge (no flush, no sync).
        Stale-low while candidates wait to be merged, so filtering by it is exact."""
        return self._kth[0]

    def push(
        self,
        scores: torch.Tensor,
        offset: int | None = None,
        index: torch.Tensor | None = None,
        payload: torch.Tensor | None = None,
        peak: float | None = None,
    ) -> None:
        """Consider `scores.numel()` more entries (any shape; flattened; NaN-free, -inf = ineligible).

        Where they sit in the global order: by default right after the previous default push (then
        `self.offset` advances); `offset` places them at [offset, offset + n) instead, and `index` gives
        each one's global index explicitly (ascending). Either way the result is the same as pushing all
        entries in global order, so tensors may arrive in any order (e.g. as backward completes them).
        `payload` (same size) is carried along with the kept entries; see `result_payload`. `peak`, an
        upper bound of the scores if the caller knows one, saves a pass when `scores` fits in one chunk.
        """
        flat = scores.reshape(-1)
        n = flat.numel()
        base = self.offset if offset is None else offset
        if index is not None:
            index = index.reshape(-1)
        if payload is not None:
            payload = payload.reshape(-1)
        if self.k > 0:
            for start in range(0, n, CHUNK):
                part = flat[start : start + CHUNK]
                first = base + start if index is None else int(index[start])
                found = self._candidates(part, first, peak if n <= CHUNK else None)
                if found is None:
                    continue
                vals, idx = found
                where = idx + (base + start) if index is None else index[start : start + CHUNK][idx]
                extra = None if payload is None else payload[start : start + CHUNK][idx]
                self._merge(vals, where, extra)
        if offset is None and index is None:
            self.offset += n

    def can_improve(self, peak: float, first: int) -> bool:
        """Whether entries whose best score is `peak`, the lowest at global index `first`, can enter."""
        if not self.full:
            return True
        kth, kth_index = self._kth
        # A tie with the k-th value enters only with a lower global index than the k-th entry's.
        return peak > kth or (peak == kth and first < kth_index)

    def _candidates(
        self, part: torch.Tensor, first: int, peak: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values, chunk-local indices) of `part`'s entries that could enter the top-k; None if none can.

        `first` is the global index of `part[0]` (indices ascend within `part`); `peak` bounds its values.
        """
        if not self.full:
            return _chunk_topk(part, self.k)
        if peak is None:
            peak = part.max().item()
        if not self.can_improve(peak, first):
            return None
        kth = self.values[-1]
        if peak == kth.item():  # only ties: the lowest-index ones, found without scanning the whole chunk
            idx = _first_equal(part, kth, self.k)
            return part[idx], idx
        idx = at_least(part, kth.item()) if part.numel() >= 4 * BLOCK else None
        if idx is None:
            idx = (part >= kth).nonzero().view(-1)
        if idx.numel() > self.k:  # many ties at the k-th value: strictly better ones, then the first ties
            above = (part > kth).nonzero().view(-1)
            if above.numel() >= self.k:
                vals, pick = _chunk_topk(part[above], self.k)
                return vals, above[pick]
            idx = torch.cat([above, _first_equal(part, kth, self.k - above.numel())])
        return part[idx], idx

    def push_candidates(
        self, values: torch.Tensor, index: torch.Tensor, payload: torch.Tensor | None = None
    ) -> None:
        """Offer entries by explicit global index, in any order (ineligible ones must be -inf)."""
        if self.k <= 0 or values.numel() == 0:
            return
        keep = values > INELIGIBLE
        self._merge(values[keep], index[keep], None if payload is None else payload[keep])

    def hold(self, values: torch.Tensor, index: torch.Tensor, kth: tuple[float, int] | None) -> None:
        """Start from an exact result computed elsewhere (`batched_topk.top_d3`): `values` / `index` sorted by
        (value desc, index asc), at most k of them; `kth` = their k-th (value, index) when there are k."""
        if self.values.numel() or self._pending:
            raise ValueError("hold() starts a StreamingTopK: it must come before any push")
        self.values, self.index = values[: self.k], index[: self.k]
        if self.full:
            self._kth = kth if kth is not None else (self.values[-1].item(), int(self.index[-1]))

    def threshold(self) -> float:
        """A score that a new entry must beat to matter (-inf while fewer than k are held)."""
        self._flush()
        return self.values[-1].item() if self.values.numel() >= self.k else INELIGIBLE

    def _merge(self, vals: torch.Tensor, idx: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        if vals.numel() == 0:
            return
        if self._with_payload is None:
            self._with_payload = extra is not None
        elif self._with_payload != (extra is not None):
            raise ValueError("either every push into a StreamingTopK carries a payload, or none does")
        self._pending.append((vals, idx, extra))
        self._pending_count += vals.numel()
        if not self.full or self._pending_count >= self.k:
            self._flush()

    def _flush(self) -> None:
        """Merge the waiting candidates into the held k: one sort by (value desc, index asc)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_count = self._pending, [], 0
        like_v, like_i = pending[0][0], pending[0][1]
        vals = torch.cat([self.values.to(like_v.device, like_v.dtype), *(v for v, _, _ in pending)])
        idx = torch.cat([self.index.to(like_i.device), *(i for _, i, _ in pending)])
        order = _order(vals, idx)[: self.k]
        if pending[0][2] is not None:
            extra = pending[0][2]
            held = self.payload if self.payload is not None else extra[:0]
            parts = [held.to(extra.device, extra.dtype), *(e for _, _, e in pending)]
            self.payload = torch.cat(parts)[order]
        self.values, self.index = vals[order], idx[order]
        if self.full:  # the k-th entry, as Python numbers: `can_improve` is asked once per chunk
            self._kth = (self.values[-1].item(), int(self.index[-1]))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, global indices), best first."""
        self._flush()
        return self.values, self.index

    def result_payload(self) -> torch.Tensor | None:
        """The payload entries of `result()`, in the same order (None if no push carried one)."""
        self._flush()
        return self.payload


def nonzero_rows(grad: torch.Tensor) -> torch.Tensor | None:
    """Sorted indices of the rows of `grad` (first dimension) holding any nonzero bit, or None if over half do.

    Bitwise, so -0.0 and NaN count as nonzero: skipped rows are exactly +0.0. One read of the gradient, no
    temporary of its size. An embedding's gradient is nonzero only in the rows of the batch's tokens.

    Example:
        >>> nonzero_rows(torch.tensor([[0.0, 0.0], [0.0, -0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))
        tensor([1, 4])
    """
    if grad.dim() < 2 or not grad.is_contiguous() or grad.numel() == 0:
        return None
    rows = grad.reshape(grad.shape[0], -1)
    # A row is exactly +0.0 everywhere iff all its bytes are 0: one max over bytes, at memory speed.
    found = rows.view(torch.uint8).amax(1).nonzero().view(-1)
    return found if found.numel() * 2 <= rows.shape[0] else None


class TensorScorer:
    """Streams tensors' scores into a `StreamingTopK`, each entry at its global index.

    Handles what `push` cannot: the fp16 loss scale, non-finite scores (ineligible; `finite` turns False),
    entries already unmasked (`excluded`: sorted flat indices; ineligible), and the D3 fast paths: scores
    are written into one reused buffer, a chunk whose gradient bound cannot enter the top-k is dropped after
    one read of the gradient (before any exclusion work), otherwise only entries whose own gradient bound
    reaches the k-th score are scored, small tensors are scored together (`push_many`), and embedding
    rows without gradient are skipped (`push_rows`). With `keep_grads`, every candidate carries its
    gradient value as the payload (low-memory mode). The push methods return the highest score seen
    (D3 only, else -inf): a hint for pushing the likely winners first next time.

    Example:
        >>> top, scorer = StreamingTopK(2), TensorScorer(d3_scores)
        >>> g, w = torch.tensor([0.5, -3.0, 1.0]), torch.ones(3)
        >>> peak = scorer.push_flat(top, g, w, offset=10, excluded=torch.tensor([1]))
        >>> top.result()[1].tolist()
        [12, 10]
    """

    def __init__(
        self,
        score_fn: Callable,
        grad_scale: float = 1.0,
        keep_grads: bool = False,
        buffer: torch.Tensor | None = None,
    ) -> None:
        self.score_fn = score_fn
        self.d3 = d3_settings(score_fn)
        self.inv_scale = 1.0 / grad_scale
        self.keep_grads = keep_grads
        self.chunk = SCORE_CHUNK if self.d3 is not None else CHUNK
        self.finite = True
        if self.d3 is not None:
            # Scores are computed in float32 against eps rounded to float32; the slack covers the roundings
            # of the computed score (division, pow, loss-scale product), so the bound is never too low.
            eps32, exp = torch.tensor(self.d3[0], dtype=torch.float32).item(), self.d3[1]
            self.bound_factor = self.inv_scale * (1 + 1e-5) / (eps32**exp if exp else 1.0)
        self.buffer = buffer  # float32 scratch for D3 scores, grown on demand; pass it on to reuse it

    @property
    def zero_grad_scores_zero(self) -> bool:
        """True when an entry with gradient exactly 0 scores 0 (or NaN) whatever its weight: D3."""
        return self.d3 is not None

    def _push_chunk(
        self,
        top: StreamingTopK,
        grad: torch.Tensor,
        weight: torch.Tensor,
        excluded: torch.Tensor | None,
        offset: int | None = None,
        index: torch.Tensor | None = None,
    ) -> float:
        """Score one chunk and push it; `excluded` holds chunk-local positions to make ineligible."""
        if self.d3 is not None and top.full:
            # (|theta| + eps)^exp >= eps^exp, so no D3 score beats |g| / eps^exp. When that bound is below
            # the k-th best, one read of the gradient settles the chunk: no weight read, no score written.
            # (A NaN weight with a finite gradient then goes unnoticed; it could never be chosen anyway.)
            low, high = torch.aminmax(grad)
            high, low = high.item() * self.bound_factor, -low.item() * self.bound_factor
            kth = top.kth
            if high < kth and low < kth:  # False for NaN: then the chunk is scored
                return max(high, low)
            if math.isfinite(high) and math.isfinite(low):
                # The same bound entry by entry: only entries with |g| >= kth / factor can enter, usually a
                # handful. Finding them reads the gradient alone (|g| and a row-wise max, then the few
                # blocks that reach the cut), and only they are scored: no weight read for the rest. If they
                # are spread over too many blocks, the chunk is scored whole as before.
                found = self._gradient_candidates(grad, kth, high >= kth, low >= kth)
                if found is not None:
                    return self._push_few(top, grad, weight, found, excluded, offset, index)
        if self.d3 is None:
            scores = self.score_fn(grad, weight)
        else:
            scores = d3_scores(grad, weight, *self.d3, out=self._scratch(grad))
        if self.inv_scale != 1.0:
            scores.mul_(self.inv_scale)
        peak = INELIGIBLE
        if self.d3 is not None:
            # D3 scores are >= 0 unless NaN/inf, and max propagates NaN: one pass tells both whether the
            # chunk is finite and whether anything in it (excluded entries included) can enter the top-k.
            peak = scores.max().item()
            clean = math.isfinite(peak)
            if clean and not top.can_improve(peak, offset if index is None else int(index[0])):
                return peak
        else:
            clean = bool(torch.isfinite(scores).all())
        if not clean:
            self.finite, peak = False, INELIGIBLE
            torch.nan_to_num_(scores, nan=INELIGIBLE, posinf=INELIGIBLE, neginf=INELIGIBLE)
        if excluded is not None:
            scores.index_fill_(0, excluded, INELIGIBLE)
        known = peak if self.d3 is not None and clean else None  # before exclusion: an upper bound
        top.push(scores, offset=offset, index=index, payload=grad if self.keep_grads else None, peak=known)
        return peak

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """`like.numel()` float32 entries of the reused buffer (grown if too small, to one chunk at least)."""
        n = like.numel()
        if self.buffer is None or self.buffer.numel() < n or self.buffer.device != like.device:
            self.buffer = torch.empty(max(n, self.chunk), device=like.device)
        return self.buffer[:n]

    def _gradient_candidates(
        self, grad: torch.Tensor, kth: float, above: bool, below: bool
    ) -> torch.Tensor | None:
        """Sorted chunk-local positions of the entries with |g| * bound_factor >= kth, or None if they are
        spread over too much of the chunk (see `at_least`).

        `above` / `below`: whether the largest positive / negative gradient can reach kth (from aminmax);
        with one side only, the blocks are found on `grad` itself, with no |g| pass.
        """
        # Dividing by a factor rounded up only lowers the cut; comparing a float tensor with a rounded cut is
        # monotone, so an entry whose bound reaches kth is never missed (extra candidates are just scored).
        cut = kth / self.bound_factor * (1 - 1e-9)
        if above and below:
            magnitude = (
                torch.abs(grad, out=self._scratch(grad)) if grad.dtype == torch.float32 else grad.abs()
            )
            return at_least(magnitude, cut)
        return at_least(grad, cut, negative=not above)

    def _push_few(
        self,
        top: StreamingTopK,
        grad: torch.Tensor,
        weight: torch.Tensor,
        found: torch.Tensor,
        excluded: torch.Tensor | None,
        offset: int | None,
        index: torch.Tensor | None,
    ) -> float:
        """Score and push only the chunk-local positions `found` (sorted) of a chunk; returns their peak."""
        if found.numel() == 0:
            return INELIGIBLE
        g = grad[found]
        scores = d3_scores(g, weight[found], *self.d3)
        if self.inv_scale != 1.0:
            scores.mul_(self.inv_scale)
        peak = scores.max().item()
        if not math.isfinite(peak):  # the gradient is finite here, so a weight is NaN/Inf
            self.finite, peak = False, INELIGIBLE
            torch.nan_to_num_(scores, nan=INELIGIBLE, posinf=INELIGIBLE, neginf=INELIGIBLE)
        if excluded is not None and excluded.numel():  # few candidates, maybe many excluded: look those up
            pos = torch.searchsorted(found, excluded).clamp_(max=found.numel() - 1)
            scores.index_fill_(0, pos[found[pos] == excluded], INELIGIBLE)
        where = found + offset if index is None else index[found]
        top.push(scores, index=where, payload=g if self.keep_grads else None)
        return peak

    def _chunks(self, lo: int, hi: int, excluded: torch.Tensor):
        """(start, stop, chunk-local excluded positions or None) for the chunks of [lo, hi)."""
        starts = list(range(lo, hi, self.chunk))
        cuts = None
        if excluded.numel():
            edges = torch.tensor([*starts, hi], dtype=excluded.dtype, device=excluded.device)
            cuts = torch.searchsorted(excluded, edges).tolist()
        for i, start in enumerate(starts):
            local = None
            if cuts is not None and cuts[i + 1] > cuts[i]:
                local = excluded[cuts[i] : cuts[i + 1]] - start
            yield start, min(start + self.chunk, hi), local

    def push_flat(
        self,
        top: StreamingTopK,
        grad: torch.Tensor | None,
        weight: torch.Tensor,
        offset: int,
        excluded: torch.Tensor,
        lo: int = 0,
        hi: int | None = None,
    ) -> float:
        """Push flat entries [lo, hi) of one tensor that starts at global `offset`; `grad=None`: zeros."""
        g = None if grad is None else grad.detach().reshape(-1)
        w = weight.detach().reshape(-1)
        if g is not None and lo == 0 and hi is None and w.numel() <= self.chunk:  # one chunk: no bookkeeping
            return self._push_chunk(top, g, w, excluded if excluded.numel() else None, offset=offset)
        peak = INELIGIBLE
        for start, stop, local in self._chunks(lo, w.numel() if hi is None else hi, excluded):
            gc = g[start:stop] if g is not None else torch.zeros(stop - start, dtype=w.dtype, device=w.device)
            peak = max(peak, self._push_chunk(top, gc, w[start:stop], local, offset=offset + start))
        return peak

    def push_gathered(
        self,
        top: StreamingTopK,
        grad: torch.Tensor,
        weight: torch.Tensor,
        index: torch.Tensor,
        excluded: torch.Tensor,
    ) -> float:
        """Push entries gathered from anywhere: `index` (ascending) is each one's global index and
        `excluded` (sorted) the positions, in these flat tensors, to make ineligible."""
        peak = INELIGIBLE
        for start, stop, local in self._chunks(0, grad.numel(), excluded):
            chunk = (grad[start:stop], weight[start:stop], local)
            peak = max(peak, self._push_chunk(top, *chunk, index=index[start:stop]))
        return peak

    def push_many(
        self,
        top: StreamingTopK,
        grads: list[torch.Tensor],
        weights: list[torch.Tensor],
        offsets: list[int],
        excluded: list[torch.Tensor],
    ) -> float:
        """Push several (small) tensors as one: a handful of ops instead of a handful per tensor."""
        if not grads:
            return INELIGIBLE
        g, w, index, ex = concatenate(grads, weights, offsets, excluded)
        if ex is None:
            ex = torch.empty(0, dtype=torch.long, device=g.device)
        return self.push_gathered(top, g, w, index, ex)

    def push_rows(
        self,
        top: StreamingTopK,
        grad: torch.Tensor,
        weight: torch.Tensor,
        offset: int,
        rows: torch.Tensor,
        excluded: torch.Tensor,
    ) -> float:
        """Push only `rows` (sorted) of a 2-D tensor; the caller owes the other rows to `push_zero_rows`.

        With D3 every other row scores 0 (its gradient is exactly +0.0), so those rows can only matter
        when fewer than k positive scores exist; the caller checks that once all tensors are in.
        """
        if rows.numel() == 0:
            return INELIGIBLE
        width = grad[0].numel()
        block = grad.detach().reshape(-1, width).index_select(0, rows)
        return self.push_row_block(top, block, weight, offset, rows, excluded)

    def push_row_block(
        self,
        top: StreamingTopK,
        block: torch.Tensor,
        weight: torch.Tensor,
        offset: int,
        rows: torch.Tensor,
        excluded: torch.Tensor,
    ) -> float:
        """`push_rows` with the rows' gradient already gathered: `block` is (len(rows), width), e.g. the values
        of a row-sparse gradient. The same caveat: the other rows are owed to `push_zero_rows`."""
        if rows.numel() == 0:
            return INELIGIBLE
        width = block.shape[1]
        g = block.detach().reshape(-1)
        w = weight.detach().reshape(-1, width).index_select(0, rows).view(-1)
        cols = torch.arange(width, device=block.device)
        index = (rows[:, None] * width + cols).view(-1) + offset
        ex = excluded[:0]
        if excluded.numel():  # excluded entries of these rows, as positions in the gathered block
            pos, col, hit = locate(rows, width, excluded)
            ex = torch.sort(pos[hit] * width + col[hit]).values
        return self.push_gathered(top, g, w, index, ex)

    def push_zero_rows(
        self,
        top: StreamingTopK,
        weight: torch.Tensor,
        offset: int,
        rows: torch.Tensor,
        excluded: torch.Tensor,
    ) -> None:
        """Push every row *not* in `rows` with a zero gradient (the exact completion of `push_rows`)."""
        height = weight.shape[0]
        width = weight[0].numel()
        starts = [0, *(rows + 1).tolist()]
        ends = [*rows.tolist(), height]
        for r0, r1 in zip(starts, ends):
            if r1 > r0:
                self.push_flat(top, None, weight, offset, excluded, lo=r0 * width, hi=r1 * width)


def concatenate(
    grads: list[torch.Tensor], weights: list[torch.Tensor], offsets: list[int], excluded: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Several (small) tensors as one flat gradient, weight and global index (ascending), plus their
    excluded positions in those flat tensors (None if there are none): one op each instead of one per tensor.
    """
    order = sorted(range(len(grads)), key=offsets.__getitem__)  # global order keeps `index` ascending
    sizes = [grads[i].numel() for i in order]
    g = torch.cat([grads[i].detach().reshape(-1) for i in order])
    w = torch.cat([weights[i].detach().reshape(-1) for i in order])
    bases = [0]
    for size in sizes[:-1]:
        bases.append(bases[-1] + size)
    shift = torch.tensor([offsets[i] - b for i, b in zip(order, bases)], device=g.device)
    repeats = torch.tensor(sizes, device=g.device)
    index = torch.arange(g.numel(), device=g.device)
    index += shift.repeat_interleave(repeats, output_size=g.numel())  # output_size: no host read
    parts = [excluded[i] + b for i, b in zip(order, bases) if excluded[i].numel()]
    return g, w, index, (torch.cat(parts) if parts else None)
