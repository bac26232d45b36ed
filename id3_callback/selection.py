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

    @property
    def full(self) -> bool:
        """True once k entries are held (from then on the k-th best value filters new chunks)."""
        return self.k > 0 and self.values.numel() >= self.k

    def push(
        self,
        scores: torch.Tensor,
        offset: int | None = None,
        index: torch.Tensor | None = None,
        payload: torch.Tensor | None = None,
    ) -> None:
        """Consider `scores.numel()` more entries (any shape; flattened; NaN-free, -inf = ineligible).

        Where they sit in the global order: by default right after the previous default push (then
        `self.offset` advances); `offset` places them at [offset, offset + n) instead, and `index` gives
        each one's global index explicitly (ascending). Either way the result is the same as pushing all
        entries in global order, so tensors may arrive in any order (e.g. as backward completes them).
        `payload` (same size) is carried along with the kept entries; see `result_payload`.
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
                found = self._candidates(part)
                if found is None:
                    continue
                vals, idx = found
                where = idx + (base + start) if index is None else index[start : start + CHUNK][idx]
                extra = None if payload is None else payload[start : start + CHUNK][idx]
                self._merge(vals, where, extra)
        if offset is None and index is None:
            self.offset += n

    def _candidates(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values, chunk-local indices) of `part`'s entries that could enter the top-k; None if none can."""
        if not self.full:
            return _chunk_topk(part, self.k)
        kth = self.values[-1]
        # Ties with the k-th value still matter (a lower global index wins), hence >= rather than >.
        if not bool(part.max() >= kth):
            return None
        idx = (part >= kth).nonzero().view(-1)
        vals = part[idx]
        if idx.numel() > self.k:  # many ties: only the k lowest-index ones can matter
            vals, pick = _chunk_topk(vals, self.k)
            idx = idx[pick]
        return vals, idx

    def push_candidates(
        self, values: torch.Tensor, index: torch.Tensor, payload: torch.Tensor | None = None
    ) -> None:
        """Offer entries by explicit global index, in any order (ineligible ones must be -inf)."""
        if self.k <= 0 or values.numel() == 0:
            return
        keep = values > INELIGIBLE
        self._merge(values[keep], index[keep], None if payload is None else payload[keep])

    def threshold(self) -> float:
        """A score that a new entry must beat to matter (-inf while fewer than k are held)."""
        return self.values[-1].item() if self.values.numel() >= self.k else INELIGIBLE

    def _merge(self, vals: torch.Tensor, idx: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        if vals.numel() == 0:
            return
        vals = torch.cat([self.values.to(vals.device, vals.dtype), vals])
        idx = torch.cat([self.index.to(idx.device), idx])
        order = _order(vals, idx)[: self.k]
        if extra is not None:
            held = self.payload if self.payload is not None else extra[:0]
            self.payload = torch.cat([held.to(extra.device, extra.dtype), extra])[order]
        elif self.payload is not None:
            raise ValueError("every push into a StreamingTopK holding payloads must carry a payload too")
        self.values, self.index = vals[order], idx[order]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, global indices), best first."""
        return self.values, self.index

    def result_payload(self) -> torch.Tensor | None:
        """The payload entries of `result()`, in the same order (None if no push carried one)."""
        return self.payload


def global_topk(score_chunks: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Top-k across tensors; returns, per input tensor, the sorted flat indices chosen in it.

    Example:
        >>> global_topk([torch.tensor([3.0, 1.0]), torch.tensor([2.0, float("nan")])], 2)
        [tensor([0]), tensor([0])]
    """
    top = StreamingTopK(k)
    sizes = []
    for scores in score_chunks:
        clean = torch.nan_to_num(scores.reshape(-1).float(), nan=INELIGIBLE, posinf=INELIGIBLE, neginf=INELIGIBLE)
        top.push(clean)
        sizes.append(clean.numel())
    return split_by_tensor(top.result()[1], sizes)


def split_by_tensor(global_index: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Split sorted-or-not global indices into per-tensor sorted local indices."""
    global_index = torch.sort(global_index).values
    bounds = torch.tensor([0, *sizes], dtype=torch.long).cumsum(0)
    cuts = torch.searchsorted(global_index, bounds)
    return [global_index[cuts[i] : cuts[i + 1]] - bounds[i] for i in range(len(sizes))]
