"""The method contract and registry.

A method answers one question: which entries join the set now. It gets a `StepContext` (how many entries,
the budget, the fp16 loss scale, the overflow flag, the scan to score with) and returns a `Selection`, or
None for nothing. The engine alone applies a selection to the unmasked set, owns the budget, and skips a
step whose gradient scores overflowed under fp16 (`ctx.check_overflow`); a method never writes engine state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..engine import ID3Engine
    from ..plan import CalibrationBatches
    from ..scan import Scan, ScoreFn

METHODS: dict[str, type[SelectionMethod]] = {}


@dataclass(frozen=True)
class StepContext:
    """What a method may use to choose: `k` entries now (in `on_start`: the whole budget), the `budget`,
    `unmasked` (entries in the set now), the fp16 loss scale and whether an overflow cancels the step, the
    `scan` to score with, and `calibration_batches` (`on_start` only; see `TrainingSettings`)."""

    k: int
    budget: int
    unmasked: int
    scan: Scan
    grad_scale: float = 1.0
    check_overflow: bool = False
    calibration_batches: CalibrationBatches | None = None


@dataclass(frozen=True)
class Selection:
    """Entries chosen by a method, as global flat indices (selectable tensors in order, concatenated).

    `scores`: theirs, for logging (None keeps the last ones). `replace`: the set becomes exactly `index`
    (repeat-S) instead of growing by it. `whole`: selectable tensors unmasked whole, with no index list
    (full fine-tuning). `grads`: gradient values aligned with `index`, kept for the optimizer (low-memory
    mode, which frees `p.grad` in backward).
    """

    index: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    replace: bool = False
    whole: tuple[str, ...] = ()
    grads: torch.Tensor | None = None


class SelectionMethod:
    """Base class: override `on_start` (choose a fixed mask) and/or `on_step` (grow it each step).

    `self.engine` is there to read (config, model, the set's tensors, the seed); choices go back as a
    `Selection`. A new method is one file in `methods/` plus a row in the tests' method table
    (docs/methods.md walks through one).

    Example:
        >>> @register_method("first-entries")                         # doctest: +SKIP
        ... class FirstEntries(SelectionMethod):
        ...     incremental = False
        ...     def on_start(self, ctx):
        ...         return Selection(torch.arange(ctx.budget))
    """

    #: True when the method follows the scheduler (grows the set during training).
    incremental = True
    #: False when the method reads gradients itself and needs them dense (see ID3Config.sparse_embedding_grads).
    sparse_grads = True

    def __init__(self, engine: ID3Engine) -> None:
        self.engine = engine

    def score_fn(self) -> ScoreFn | None:
        """The per-entry score (gradient, weight) -> score an incremental method ranks the gradients by, or None.

        Declaring one makes the method usable in low-memory mode, which scores each gradient with it inside
        backward and selects without calling `on_step`.
        """
        return None

    def budget_override(self) -> tuple[int, str] | None:
        """(entry count, what they are) for a method that trains a fixed set whatever the configured budget
        (bitfit, full): the engine's budget becomes that count. None: the configured budget applies."""
        return None

    def on_start(self, ctx: StepContext) -> Selection | None:
        """Called once, before the first step, with no entry unmasked; `ctx.k` is the whole budget."""
        return None

    def on_step(self, ctx: StepContext) -> Selection | None:
        """Called after each backward with complete gradients; `ctx.k` is the schedule's count for this step."""
        return None

    def describe(self) -> str:
        """One line for the engine's summary when the method departs from the D3 default ("" for none)."""
        return ""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def register_method(name: str) -> Callable[[type[SelectionMethod]], type[SelectionMethod]]:
    """Class decorator registering a `SelectionMethod` under `name` (the value of `ID3Config.method`).

    Example:
        >>> @register_method("my-method")  # doctest: +SKIP
        ... class MyMethod(SelectionMethod): ...
    """

    def wrap(cls: type[SelectionMethod]) -> type[SelectionMethod]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[SelectionMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {available_methods()}.")
    return METHODS[name]
