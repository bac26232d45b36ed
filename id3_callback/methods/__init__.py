"""Selection methods: one small file each, registered by name (`ID3Config.method`).

A method decides which entries join the unmasked set: incremental methods on every step (`on_step`),
static ones once before training (`on_start`). Everything else (budget, masking, optimizer, delta,
checkpoints) is shared, so methods compare like with like.
"""

from __future__ import annotations

from . import bitfit as _bitfit  # noqa: F401  (each import registers a method)
from . import fish as _fish  # noqa: F401
from . import full as _full  # noqa: F401
from . import id3 as _id3  # noqa: F401
from . import increment_magnitude as _increment_magnitude  # noqa: F401
from . import pafi as _pafi  # noqa: F401
from . import random_mask as _random_mask  # noqa: F401
from . import repeat as _repeat  # noqa: F401
from . import static as _static  # noqa: F401
from .base import METHODS, SelectionMethod, available_methods, get_method, register_method

__all__ = ["METHODS", "SelectionMethod", "available_methods", "get_method", "register_method"]
