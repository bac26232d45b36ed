"""Selection methods: one small file each, registered by name (`ID3Config.method`).

A method decides which entries join the unmasked set: incremental methods on every step (`on_step`),
static ones once before training (`on_start`). Everything else (budget, masking, optimizer, delta,
checkpoints) is shared, so methods compare like with like.
"""

from __future__ import annotations

from . import id3 as _id3  # noqa: F401  (registers)
from .base import METHODS, SelectionMethod, available_methods, get_method, register_method

__all__ = ["METHODS", "SelectionMethod", "available_methods", "get_method", "register_method"]
