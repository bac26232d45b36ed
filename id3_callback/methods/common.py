"""Helpers shared by the selection methods: exact global top-k over any per-entry score.

`ID3Engine.select_top` scores the current gradients and skips tensors without one. The methods here score
weights alone (PaFi) or Fisher accumulators (FISH), so they stream their own chunks through the same
`StreamingTopK` (exact, deterministic ties: the lower global index wins). repeat-S scores D3 like ID3, so
it uses the engine's `TensorScorer` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..selection import CHUNK, INELIGIBLE, StreamingTopK, split_by_tensor

if TYPE_CHECKING:
    from ..engine import ID3Engine

#: score(name, param, start, stop) -> float32 scores of flat entries [start, stop) of `param`, a fresh tensor.
ChunkScore = Callable[[str, torch.Tensor, int, int], torch.Tensor]


def top_entries(engine: ID3Engine, k: int, score: ChunkScore) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The k best entries over all selectable tensors: (scores, global flat indices, all scores finite).

    Non-finite scores are ineligible, and so are entries already in the set.

    Example:
        >>> top_entries(engine, 10, lambda n, p, a, b: p.detach().reshape(-1)[a:b].abs().neg())  # doctest: +SKIP
    """
    top = StreamingTopK(k)
    finite = True
    for name, p in engine.unmasked.params.items():
        n = p.numel()
        if name in engine.unmasked.full:
            top.offset += n
            continue
        idx = engine.unmasked.indices[name]
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
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


def weight_chunk(p: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return p.detach().reshape(-1)[start:stop]


def add_selected(engine: ID3Engine, values: torch.Tensor, index: torch.Tensor) -> None:
    """Unmask entries chosen by `top_entries` and keep their scores for logging, like `select_top`."""
    engine.last_selected_scores = values.detach().cpu()
    engine.add_global(index)


def per_tensor(engine: ID3Engine, global_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Global flat indices -> {tensor name: sorted local indices} over the selectable tensors."""
    sizes = [p.numel() for p in engine.unmasked.params.values()]
    return dict(zip(engine.unmasked.params, split_by_tensor(global_index.cpu(), sizes)))


def fixed_budget(engine: ID3Engine, count: int, method: str, what: str) -> None:
    """Methods whose set size is not a choice (bitfit, full) report the count they actually use as budget."""
    import warnings

    if count != engine.budget:
        warnings.warn(
            f"method {method!r} trains {what}: {count:,} entries, not the configured budget of "
            f"{engine.budget:,}; the budget is set to {count:,}.",
            stacklevel=4,
        )
    engine.budget = count
