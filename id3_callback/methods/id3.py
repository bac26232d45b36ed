"""ID3 (increment-S with D3): each step, the k highest D3 scores among still-masked entries join the set."""

from __future__ import annotations

from functools import partial

from ..scores import d3_scores
from .base import SelectionMethod, register_method


@register_method("id3")
class ID3(SelectionMethod):
    incremental = True

    def score_fn(self):
        """The score `on_step` ranks by; the engine's low-memory mode scores with it in gradient hooks."""
        config = self.engine.config
        return partial(d3_scores, eps=config.eps, exp=config.exp)

    def on_step(self, k: int) -> bool:
        if k <= 0:
            return True
        return self.engine.select_top(k, self.score_fn())
