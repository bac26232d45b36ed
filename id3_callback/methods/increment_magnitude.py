"""increment-S with a magnitude score (the paper's increment-PaFi): each step, the k smallest |theta| join.

Masked entries never change, so the ranking among them is the pre-training one: the final set equals PaFi's;
only the order in which entries start training differs.
"""

from __future__ import annotations

from ..scan import weight_chunk
from ..scores import magnitude_scores
from .base import Selection, SelectionMethod, StepContext, register_method


@register_method("increment-magnitude")
class IncrementMagnitude(SelectionMethod):
    """Follows the scheduler like ID3, scoring by -|theta| (no gradients needed).

    Example:
        >>> ID3Config(method="increment-magnitude", budget=1000)  # doctest: +SKIP
    """

    incremental = True

    def on_step(self, ctx: StepContext) -> Selection | None:
        if ctx.k <= 0:
            return None
        scores, index, _ = ctx.scan.top_entries(
            ctx.k, lambda name, p, start, stop: magnitude_scores(weight_chunk(p, start, stop))
        )
        return Selection(index, scores)

    def describe(self) -> str:
        return "increment-PaFi: the k smallest |theta| among masked entries join each step"
