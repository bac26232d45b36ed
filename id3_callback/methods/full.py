"""full: full fine-tuning through the same engine, optimizer and delta path (a like-for-like baseline).

Every selectable tensor is unmasked whole (`UnmaskedSet.unmask_all`): no index list and no copy of the
base values (only a checksum), so memory is that of ordinary full fine-tuning with AdamW.
"""

from __future__ import annotations

from .base import Selection, SelectionMethod, StepContext, register_method


@register_method("full")
class Full(SelectionMethod):
    """Unmasks every selectable entry before training; the budget becomes the selectable count.

    Example:
        >>> ID3Config(method="full")  # doctest: +SKIP
    """

    incremental = False
    sparse_grads = False  # whole tensors train from their dense gradient

    def budget_override(self) -> tuple[int, str]:
        return sum(p.numel() for p in self.engine.unmasked.params.values()), "every selectable entry"

    def on_start(self, ctx: StepContext) -> Selection:
        return Selection(whole=tuple(self.engine.unmasked.params))

    def describe(self) -> str:
        return "full fine-tuning: every selectable entry"
