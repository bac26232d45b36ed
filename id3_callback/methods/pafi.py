"""PaFi: the B entries of smallest |theta| before training, fixed."""

from __future__ import annotations

from ..scores import magnitude_scores
from .base import SelectionMethod, register_method
from .common import add_selected, top_entries, weight_chunk


@register_method("pafi")
class PaFi(SelectionMethod):
    """Chooses the whole budget before training by weight magnitude alone (ties: lower global index first).

    Example:
        >>> ID3Config(method="pafi", budget=1000)  # doctest: +SKIP
    """

    incremental = False

    def on_start(self) -> None:
        values, index, _ = top_entries(
            self.engine,
            self.engine.budget,
            lambda name, p, start, stop: magnitude_scores(weight_chunk(p, start, stop)),
        )
        add_selected(self.engine, values, index)

    def describe(self) -> str:
        return "PaFi: the B smallest |theta| before training, fixed"
