"""random: B entries drawn uniformly without replacement (seeded), fixed."""

from __future__ import annotations

import torch

from .base import Selection, SelectionMethod, StepContext, register_method


def sample_without_replacement(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct integers from [0, n), uniformly, in O(k) memory (never an n-sized permutation for k <= n/2).

    Draws with replacement and keeps first occurrences in draw order: that is sequential sampling without
    replacement, so every k-subset is equally likely. Deterministic for a given generator state.

    Example:
        >>> sample_without_replacement(10**12, 3, torch.Generator().manual_seed(0)).numel()
        3
    """
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} distinct entries out of {n}.")
    if 2 * k > n:  # dense regime: a permutation costs O(n) = O(k)
        return torch.randperm(n, generator=generator)[:k]
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        need = k - chosen.numel()
        # With k <= n/2 at most half of the draws repeat, so ~1.5x covers most rounds in one go.
        draws = torch.randint(n, (need + need // 2 + 16,), generator=generator)
        pool = torch.cat([chosen, draws])
        unique, inverse = torch.unique(pool, return_inverse=True)
        first = torch.full((unique.numel(),), pool.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(pool.numel()), reduce="amin")
        chosen = pool[torch.sort(first).values[:k]]
    return chosen


@register_method("random")
class RandomMask(SelectionMethod):
    """Uniform random entries, seeded by the engine's seed (`mask_seed`, else `TrainingArguments.seed`).

    Example:
        >>> ID3Config(method="random", budget=1000, mask_seed=3)  # doctest: +SKIP
    """

    incremental = False

    def on_start(self, ctx: StepContext) -> Selection:
        generator = torch.Generator().manual_seed(self.engine.seed)
        return Selection(sample_without_replacement(ctx.scan.total, ctx.budget, generator))

    def describe(self) -> str:
        return f"random: B entries uniformly at random (seed {self.engine.seed}), fixed"
