"""increment-S with a magnitude score (the paper's increment-PaFi): each step, the k smallest |theta| join.

Masked entries never change, so the ranking among them is the pre-training one: the final set equals PaFi's;
only the order in which entries start training differs.
"""

from __future__ import annotations

from ..scores import magnitude_scores
from .base import SelectionMethod, register_method
from .common import add_selected, top_entries, weight_chunk


@register_method("increment-magnitude")
class IncrementMagnitude(SelectionMethod):
    """Follows the scheduler like ID3, scoring by -|theta| (no gradients needed).

    Example:
        >>> ID3Config(method="increment-magnitude", budget=1000)  # doctest: +SKIP
    """

    incremental = True

    def on_step(self, k: int) -> bool:
        if k > 0:
            values, index, _ = top_entries(
                self.engine, k, lambda name, p, start, stop: magnitude_scores(weight_chunk(p, start, stop))
            )
            add_selected(self.engine, values, index)
        return True

    def describe(self) -> str:
        return "increment-PaFi: the k smallest |theta| among masked entries join each step"
