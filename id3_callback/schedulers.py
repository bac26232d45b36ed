"""How many entries join the unmasked set at each step.

A scheduler maps (budget B, steps T) to T non-negative counts that sum to exactly B. The engine reads the
cumulative sums, so a step that selects fewer entries than scheduled (e.g. an fp16 overflow step) carries
the shortfall to the next step instead of losing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import accumulate

SchedulerFn = Callable[[int, int], list[int]]
SCHEDULERS: dict[str, SchedulerFn] = {}


def register_scheduler(name: str) -> Callable[[SchedulerFn], SchedulerFn]:
    """Register a scheduler under `name` (usable as `ID3Config(scheduler=name)`)."""

    def wrap(fn: SchedulerFn) -> SchedulerFn:
        SCHEDULERS[name] = fn
        return fn

    return wrap


def _apportion(budget: int, weights: list[float]) -> list[int]:
    """Split `budget` proportionally to `weights`, exactly, the rounding remainder going to the first steps."""
    total = sum(weights)
    counts = [int(budget * w // total) for w in weights]
    for t in range(budget - sum(counts)):
        counts[t % len(counts)] += 1
    return counts


@register_scheduler("uniform")
def uniform(budget: int, total_steps: int) -> list[int]:
    """The paper's scheduler: floor(B/T) per step, the remainder one per step over the first steps.

    Example:
        >>> uniform(10, 4)
        [3, 3, 2, 2]
    """
    per_step, remainder = divmod(budget, total_steps)
    return [per_step + 1] * remainder + [per_step] * (total_steps - remainder)


@register_scheduler("linear")
def linear(budget: int, total_steps: int) -> list[int]:
    """Front-loaded: step t gets a share proportional to T - t (t from 0), so the first step gets the most.

    Example:
        >>> linear(10, 4)
        [4, 3, 2, 1]
    """
    return _apportion(budget, [float(total_steps - t) for t in range(total_steps)])


@register_scheduler("exponential")
def exponential(budget: int, total_steps: int, half_life: float | None = None) -> list[int]:
    """Front-loaded: shares halve every `half_life` steps (default T/8), so most entries join early.

    Example:
        >>> sum(exponential(1000, 50)) == 1000
        True
    """
    half_life = half_life or max(total_steps / 8, 1.0)
    return _apportion(budget, [0.5 ** (t / half_life) for t in range(total_steps)])


@register_scheduler("front_loaded")
def front_loaded(budget: int, total_steps: int, fraction: float = 0.25) -> list[int]:
    """Every entry joins in the first quarter of the steps (uniform there, none after): the paper's
    scheduler ablation against spreading the budget over the whole run.

    Example:
        >>> front_loaded(10, 8)
        [5, 5, 0, 0, 0, 0, 0, 0]
    """
    head = max(1, math.ceil(total_steps * fraction))
    return uniform(budget, head) + [0] * (total_steps - head)


class Schedule:
    """Cumulative unmasking targets for a budget over `total_steps` optimizer steps.

    Example:
        >>> s = Schedule("uniform", budget=10, total_steps=4)
        >>> [s.target(t) for t in range(1, 6)]
        [3, 6, 8, 10, 10]
    """

    def __init__(self, name: str, budget: int, total_steps: int) -> None:
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}: choose one of {sorted(SCHEDULERS)}.")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 (got {total_steps}).")
        counts = SCHEDULERS[name](budget, total_steps)
        if len(counts) != total_steps or sum(counts) != budget or min(counts) < 0:
            raise AssertionError(
                f"scheduler {name!r} must return {total_steps} counts >= 0 summing to {budget}"
            )
        self.name, self.budget, self.total_steps = name, budget, total_steps
        self.counts = counts
        self._cumulative = list(accumulate(counts))

    def target(self, step: int) -> int:
        """How many entries should be unmasked after `step` steps (1-based); B from step T on."""
        if step <= 0:
            return 0
        return self._cumulative[min(step, self.total_steps) - 1]

    def describe(self) -> str:
        lo, hi = min(self.counts), max(self.counts)
        per_step = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
        return f"{self.name} over {self.total_steps:,} steps ({per_step} per step)"
