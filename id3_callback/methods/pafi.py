"""PaFi: the B entries of smallest |theta| before training, fixed."""

from __future__ import annotations

from ..scan import weight_chunk
from ..scores import magnitude_scores
from .base import Selection, SelectionMethod, StepContext, register_method


@register_method("pafi")
class PaFi(SelectionMethod):
    """Chooses the whole budget before training by weight magnitude alone (ties: lower global index first).

    Example:
        >>> ID3Config(method="pafi", budget=1000)  # doctest: +SKIP
    """

    incremental = False

    def on_start(self, ctx: StepContext) -> Selection:
        scores, index, _ = ctx.scan.top_entries(
            ctx.budget, lambda name, p, start, stop: magnitude_scores(weight_chunk(p, start, stop))
        )
        return Selection(index, scores)

    def describe(self) -> str:
        return "PaFi: the B smallest |theta| before training, fixed"
