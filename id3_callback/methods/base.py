"""The method interface and registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine import ID3Engine

METHODS: dict[str, type[SelectionMethod]] = {}


class SelectionMethod:
    """Base class: override `on_start` (choose a fixed mask) and/or `on_step` (grow it each step).

    Example:
        >>> @register_method("first-entries")                         # doctest: +SKIP
        ... class FirstEntries(SelectionMethod):
        ...     incremental = False
        ...     def on_start(self):
        ...         self.engine.add_global(torch.arange(self.engine.budget))
    """

    #: True when the method follows the scheduler (grows the set during training).
    incremental = True
    #: False when the method reads gradients itself and needs them dense (see ID3Config.sparse_embedding_grads).
    sparse_grads = True

    def __init__(self, engine: ID3Engine) -> None:
        self.engine = engine

    def on_start(self) -> None:
        """Called once, before the first step, with no entry unmasked."""

    def on_step(self, k: int) -> bool:
        """Called after each backward with complete gradients; `k` is the schedule's count for this step.

        Returns False if the step's gradients overflowed and nothing could be selected.
        """
        return True

    def describe(self) -> str:
        """One line for the engine's summary when the method departs from the D3 default ("" for none)."""
        return ""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def register_method(name: str):
    """Class decorator registering a `SelectionMethod` under `name`."""

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
