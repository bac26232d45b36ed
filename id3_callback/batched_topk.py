"""The exact D3 top-k over many gradients with a constant number of host synchronisations per step.

`StreamingTopK` decides chunk by chunk on the host (is this chunk's bound below the k-th score?), which reads
a number back from the device for every chunk: on a GPU each read stalls the stream, and on a busy CPU each
of the many small ops is a parallel region that waits for a descheduled thread. Here the decisions are made
for all tensors at once, in three rounds, each ending in one read of a few integers:

1. Every gradient's blocks of `selection.BOUND_BLOCK` entries get a bound, max |g| (one reduction per tensor). The
   best-bounded blocks, enough to hold k + |excluded| entries, are the *seed*; read: which tensor holds
   how many seed blocks.
2. The seed is scored exactly; its k-th best score T is a lower bound of the true k-th score (any k eligible
   entries bound it from below). A block can hold a winner only if its bound times the D3 factor reaches T
   (|theta| + eps >= eps): those are the *hot* blocks; read: how many per tensor.
3. Hot blocks are gathered and scored (a tensor with too many is scored whole, chunk by chunk, keeping each
   chunk's exact top-k); the pool of seed and hot candidates gives the result under (score desc, global
   index asc); read: how many are eligible, and whether every score was finite.

The result is bitwise that of `torch.cat(all scores).topk(k)` with ties to the lower global index (-inf,
NaN and Inf never chosen), as `tests/test_selection_perf_paths.py` and `tests/test_syncs.py` check.
Extra memory: one float per block (1/128 of the entries, about 62 MiB at 2B entries) and the pool,
O(k + |excluded| + hot entries).

Example:
    >>> g, w = torch.tensor([0.5, -3.0, 1.0]), torch.ones(3)
    >>> top_d3([Segment(g, w, offset=10, excluded=torch.tensor([1]))], k=2, eps=1e-3, exp=1.0)[1].tolist()
    [12, 10]
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from . import selection
from .scores import d3_scores
from .selection import INELIGIBLE, _order


@dataclass
class Segment:
    """Flat gradient and weight entries that sit at global indices `offset + i`, or at `index[i]` (ascending).

    `excluded`: sorted positions (into these flat tensors) of entries already unmasked: ineligible.
    """

    grad: torch.Tensor
    weight: torch.Tensor
    offset: int = 0
    excluded: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def global_index(self, local: torch.Tensor) -> torch.Tensor:
        return local + self.offset if self.index is None else self.index[local]


def bound_factor(eps: float, exp: float, grad_scale: float = 1.0) -> float:
    """No D3 score exceeds |g| * this: (|theta| + eps)^exp >= eps^exp. The slack covers the float32 roundings
    of the computed score (eps rounded to float32, division, pow, the loss-scale product)."""
    eps32 = struct.unpack("f", struct.pack("f", eps))[0]  # eps rounded to float32, on the host
    return (1.0 / grad_scale) * (1 + 1e-5) / (eps32**exp if exp else 1.0)


class _Scorer:
    """D3 scores of pieces of segments (eps, exp, 1 / loss scale)."""

    def __init__(self, eps: float, exp: float, grad_scale: float) -> None:
        self.eps, self.exp, self.inv_scale = eps, exp, 1.0 / grad_scale

    def scores(self, g: torch.Tensor, w: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of (g, w), non-finite ones -inf, plus one spare slot at the end: index fills aimed at it are
        no-ops, so excluded entries are filled without selecting them on the host. Into `buffer` if given."""
        n = g.numel() + 1
        out = torch.empty(n, dtype=torch.float32, device=g.device) if buffer is None else buffer[:n]
        scores = d3_scores(g, w, self.eps, self.exp, out=out[:-1])
        if self.inv_scale != 1.0:
            scores.mul_(self.inv_scale)
        torch.nan_to_num_(out, nan=INELIGIBLE, posinf=INELIGIBLE, neginf=INELIGIBLE)
        return out


def _fill(out: torch.Tensor, target: torch.Tensor, hit: torch.Tensor) -> None:
    """out[target[hit]] = -inf, with misses aimed at the spare last slot (no compaction, no host read)."""
    spare = torch.full_like(target, out.numel() - 1)
    out.index_fill_(0, torch.where(hit, target, spare), INELIGIBLE)


def _score_blocks(seg: Segment, blocks: torch.Tensor, scorer: _Scorer) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, global indices) of the whole blocks `blocks` (ascending block numbers) of `seg`."""
    size = selection.BOUND_BLOCK
    whole = seg.grad.numel() // size * size
    g = seg.grad[:whole].view(-1, size).index_select(0, blocks).view(-1)
    w = seg.weight[:whole].view(-1, size).index_select(0, blocks).view(-1)
    out = scorer.scores(g, w)
    if seg.excluded is not None and seg.excluded.numel():
        block_of = seg.excluded // size
        pos = torch.searchsorted(blocks, block_of).clamp_(max=blocks.numel() - 1)
        _fill(out, pos * size + seg.excluded % size, blocks[pos] == block_of)
    local = (blocks[:, None] * size + torch.arange(size, device=blocks.device)).view(-1)
    return out[:-1], seg.global_index(local)


def _score_range(
    seg: Segment,
    lo: int,
    hi: int,
    scorer: _Scorer,
    buffer: torch.Tensor | None = None,
    skip_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, global indices) of flat entries [lo, hi) of `seg` (the scores a view of `buffer` if given);
    entries of `skip_blocks` (block numbers, scored elsewhere) are made ineligible, so none is pooled twice."""
    out = scorer.scores(seg.grad[lo:hi], seg.weight[lo:hi], buffer)
    ex = seg.excluded
    if ex is not None and ex.numel():
        _fill(out, ex - lo, (ex >= lo) & (ex < hi))
    if skip_blocks is not None and skip_blocks.numel():
        size = selection.BOUND_BLOCK
        ex = (skip_blocks[:, None] * size + torch.arange(size, device=skip_blocks.device)).view(-1)
        _fill(out, ex - lo, (ex >= lo) & (ex < hi))
    local = torch.arange(lo, hi, device=seg.grad.device)
    return out[:-1], seg.global_index(local)


def _chunk_best(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2k candidates holding the exact top-k of (scores, global indices), in any order: the entries above the
    k-th value, and the k lowest indices among those equal to it (torch.topk breaks ties arbitrarily).
    The outputs are fresh tensors: `scores` may live in a reused buffer."""
    if scores.numel() <= 2 * k:
        return scores.clone(), index.clone()
    values, pos = torch.topk(scores, k, sorted=False)
    kth = values.amin()
    above = torch.where(values > kth, values, INELIGIBLE)
    last = torch.iinfo(index.dtype).max
    tied = torch.topk(torch.where(scores == kth, index, last), k, largest=False, sorted=False).values
    tie_values = torch.where(tied != last, kth, INELIGIBLE)
    return torch.cat([above, tie_values]), torch.cat([index[pos], tied])


def _best(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (value, index) pairs (distinct indices), by (score desc, index asc)."""
    if values.numel() > 2 * k:
        values, index = _chunk_best(values, index, k)
    order = _order(values, index)[:k]
    return values[order], index[order]


def top_d3(
    segments: list[Segment],
    k: int,
    eps: float,
    exp: float,
    grad_scale: float = 1.0,
    buffer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool, tuple[float, int] | None]:
    """(scores, global indices, every score finite, the k-th (score, index) or None if fewer than k) of the
    k best eligible entries of `segments` under D3 |g / grad_scale| / (|theta| + eps)^exp, best first, ties
    to the lower global index. Three host reads. `buffer` (float32, reused across steps) holds the scores of
    a segment scored whole, one `selection.SCORE_CHUNK` at a time (grown if too small).

    Example:
        >>> seg = Segment(torch.tensor([1.0, 2.0, 2.0]), torch.zeros(3))
        >>> top_d3([seg], k=2, eps=1.0, exp=1.0)[1].tolist()
        [1, 2]
    """
    segments = [s for s in segments if s.grad.numel()]
    if k <= 0 or not segments:
        return torch.empty(0), torch.empty(0, dtype=torch.long), True, None
    device = segments[0].grad.device
    size = selection.BOUND_BLOCK
    scorer = _Scorer(eps, exp, grad_scale)
    pool: list[tuple[torch.Tensor, torch.Tensor]] = []
    pooled = 0

    def add(piece: tuple[torch.Tensor, torch.Tensor]) -> None:
        nonlocal pool, pooled
        pool.append(piece)
        pooled += piece[0].numel()
        if pooled > 4 * k + (1 << 22):  # bounded memory: keep 2k candidates of the pool (sizes known here)
            pool = [_chunk_best(torch.cat([v for v, _ in pool]), torch.cat([i for _, i in pool]), k)]
            pooled = pool[0][0].numel()

    # 1. A bound per block of every segment (tails shorter than a block are scored outright).
    counts = [s.grad.numel() // size for s in segments]
    firsts = [0]
    for c in counts:
        firsts.append(firsts[-1] + c)
    maxima = []
    step = max(selection.SCORE_CHUNK // size, 1) * size
    if buffer is None or buffer.numel() < step or buffer.device != device:
        buffer = torch.empty(max(step, selection.SCORE_CHUNK) + 1, dtype=torch.float32, device=device)
    for s, c in zip(segments, counts):
        for lo in range(
            0, c * size, step
        ):  # |g| into the (cache-sized) buffer, then a row-wise max: NaN stays
            hi = min(lo + step, c * size)
            part, into = s.grad[lo:hi], buffer[: hi - lo]
            magnitude = torch.abs(part, out=into) if part.dtype == into.dtype else into.copy_(part).abs_()
            maxima.append(magnitude.view(-1, size).amax(1))
    # Finite gradients <=> finite bounds (NaN and Inf propagate through max); tails by their scores.
    bounds = torch.cat(maxima) if maxima else None
    peaks = [] if bounds is None else [bounds.amax()]
    for s, c in zip(segments, counts):
        if s.grad.numel() > c * size:
            tail = s.grad[c * size :]
            peaks.append(torch.maximum(tail.amax(), tail.amin().neg()).float())
            add(_score_range(s, c * size, s.grad.numel(), scorer))
    n_blocks = firsts[-1]
    excluded = sum(0 if s.excluded is None else s.excluded.numel() for s in segments)
    seed_blocks = math.ceil((k + excluded) / size)
    if n_blocks == 0 or seed_blocks >= n_blocks:  # k is most of the entries: score everything
        hot_counts, hot = counts, None
    else:
        seed = torch.sort(torch.topk(bounds, seed_blocks, sorted=False).indices).values
        edges = torch.tensor(firsts, device=device)
        cuts = torch.searchsorted(seed, edges).tolist()  # host read 1
        for s, first, a, b in zip(segments, firsts, cuts, cuts[1:]):
            if b > a:
                add(_score_blocks(s, seed[a:b] - first, scorer))
        # 2. The seed holds >= k eligible entries unless some scored non-finite: its k-th best bounds the
        # k-th score from below (-inf when it is short; then every block is hot).
        seed_scores = torch.cat([v for v, _ in pool])
        kth = torch.topk(seed_scores, k, sorted=False).values.amin()
        # Dividing by a factor rounded up lowers the cut, and the margin covers the cut's rounding to
        # float32: a block whose bound reaches the k-th score is never missed (extras are just scored).
        cut = kth * (1.0 / bound_factor(eps, exp, grad_scale) * (1 - 1e-6))
        hot = ~(bounds < cut)  # NaN bounds are hot: their finite entries are scored
        hot.index_fill_(0, seed, False)
        prefix = torch.cat([hot.new_zeros(1, dtype=torch.long), hot.cumsum(0)])
        hot_counts = (prefix[edges[1:]] - prefix[edges[:-1]]).tolist()  # host read 2
    # 3. Hot blocks gathered, or a segment scored whole when they are most of it.
    for i, (s, first, c, h) in enumerate(zip(segments, firsts, counts, hot_counts)):
        if h == 0:
            continue
        if hot is not None and h * size <= selection.FEW * c * size:
            blocks = torch.nonzero_static(hot[first : first + c], size=h).view(-1)
            add(_score_blocks(s, blocks, scorer))
            continue
        chunk = selection.SCORE_CHUNK
        seeded = None if hot is None else seed[cuts[i] : cuts[i + 1]] - first  # pooled already
        for lo in range(0, c * size, chunk):
            hi = min(lo + chunk, c * size)
            add(_chunk_best(*_score_range(s, lo, hi, scorer, buffer, seeded), k))
    values, index = _best(torch.cat([v for v, _ in pool]), torch.cat([i for _, i in pool]), k)
    finite = torch.isfinite(torch.stack(peaks)).all() if peaks else torch.ones((), device=device)
    facts = [(values > INELIGIBLE).sum(), finite, values[-1], index[-1]]
    eligible, finite, kth_value, kth_index = torch.stack([f.double() for f in facts]).tolist()  # read 3
    eligible = int(eligible)
    kth = (kth_value, int(kth_index)) if eligible == k else None
    return values[:eligible], index[:eligible], bool(finite), kth


def concatenated(
    grads: list[torch.Tensor], weights: list[torch.Tensor], offsets: list[int], excluded: list[torch.Tensor]
) -> Segment:
    """Several (small) tensors as one segment, in global order: one op each instead of one per tensor."""
    g, w, index, ex = selection.concatenate(grads, weights, offsets, excluded)
    return Segment(g, w, excluded=ex, index=index)
