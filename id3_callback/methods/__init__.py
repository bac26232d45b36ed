"""Selection methods: one small file each, registered by name (`ID3Config.method`).

A method decides which entries join the unmasked set: incremental methods on every step (`on_step`),
static ones once before training (`on_start`). Everything else (budget, masking, optimizer, delta,
checkpoints) is shared, so methods compare like with like. Every module in this folder is imported here,
so a new method is one new file (and a row in the tests' method table; see docs/methods.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    METHODS,
    Selection,
    SelectionMethod,
    StepContext,
    available_methods,
    get_method,
    register_method,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # each import registers its method

__all__ = [
    "METHODS",
    "Selection",
    "SelectionMethod",
    "StepContext",
    "available_methods",
    "get_method",
    "register_method",
]
