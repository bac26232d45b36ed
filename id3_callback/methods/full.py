"""full: full fine-tuning through the same engine, optimizer and delta path (a like-for-like baseline).

Every selectable tensor is unmasked whole (`UnmaskedSet.unmask_all`): no index list and no copy of the
base values (only a checksum), so memory is that of ordinary full fine-tuning with AdamW.
"""

from __future__ import annotations

from .base import SelectionMethod, register_method
from .common import fixed_budget


@register_method("full")
class Full(SelectionMethod):
    """Unmasks every selectable entry before training; the budget becomes the selectable count.

    Example:
        >>> ID3Config(method="full")  # doctest: +SKIP
    """

    incremental = False
    sparse_grads = False  # whole tensors train from their dense gradient

    def __init__(self, engine) -> None:
        super().__init__(engine)
        fixed_budget(engine, engine.selectable, "full", "every selectable entry")

    def on_start(self) -> None:
        for name in self.engine.unmasked.params:
            self.engine.unmasked.unmask_all(name)

    def describe(self) -> str:
        return "full fine-tuning: every selectable entry"
