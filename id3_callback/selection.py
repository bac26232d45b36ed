"""Exact global top-k over many score tensors without ever concatenating them.

Order: higher score first; among equal scores the lower *global* flat index wins (tensors in the order they
are pushed, then flat position), so the result equals `torch.cat(all).topk(k)` with deterministic ties.
Scores of -inf mark ineligible entries (already unmasked, NaN/Inf gradients) and are never chosen.

Memory: the running best-k buffer plus one chunk's candidates, O(k + chunk), independent of the total size.
"""

from __future__ import annotations

import torch

INELIGIBLE = float("-inf")
# Score tensors are processed in slices of this many entries, so temporaries stay bounded for huge tensors.
CHUNK = 1 << 22


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


def _order(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Permutation sorting by (value desc, index asc)."""
    by_index = torch.argsort(index, stable=True)
    by_value = torch.argsort(values[by_index], descending=True, stable=True)
    return by_index[by_value]


class StreamingTopK:
    """Feed score chunks in order, then read the k best (value, global index) pairs.

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

    def push(self, scores: torch.Tensor) -> None:
        """Consider the next `scores.numel()` entries (any shape; flattened)."""
        flat = scores.reshape(-1)
        if self.k > 0:
            for start in range(0, flat.numel(), CHUNK):
                part = flat[start : start + CHUNK]
                vals, idx = _chunk_topk(part, self.k)
                self._merge(vals, idx + (self.offset + start))
        self.offset += flat.numel()

    def threshold(self) -> float:
        """A score that a new entry must beat to matter (-inf while fewer than k are held)."""
        return self.values[-1].item() if self.values.numel() >= self.k else INELIGIBLE

    def _merge(self, vals: torch.Tensor, idx: torch.Tensor) -> None:
        if vals.numel() == 0:
            return
        vals = torch.cat([self.values.to(vals.device, vals.dtype), vals])
        idx = torch.cat([self.index.to(idx.device), idx])
        order = _order(vals, idx)[: self.k]
        self.values, self.index = vals[order], idx[order]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, global indices), best first."""
        return self.values, self.index


def global_topk(score_chunks: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Top-k across tensors; returns, per input tensor, the sorted flat indices chosen in it.

    Example:
        >>> global_topk([torch.tensor([3.0, 1.0]), torch.tensor([2.0, float("nan")])], 2)
        [tensor([0]), tensor([0])]
    """
    top = StreamingTopK(k)
    sizes = []
    for scores in score_chunks:
        clean = torch.nan_to_num(scores.reshape(-1).float(), nan=INELIGIBLE, posinf=INELIGIBLE)
        top.push(clean)
        sizes.append(clean.numel())
    return split_by_tensor(top.result()[1], sizes)


def split_by_tensor(global_index: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Split sorted-or-not global indices into per-tensor sorted local indices."""
    global_index = torch.sort(global_index).values
    bounds = torch.tensor([0, *sizes], dtype=torch.long).cumsum(0)
    cuts = torch.searchsorted(global_index, bounds)
    return [global_index[cuts[i] : cuts[i + 1]] - bounds[i] for i in range(len(sizes))]
