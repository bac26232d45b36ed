"""ID3 (increment-S with D3): each step, the k highest D3 scores among still-masked entries join the set."""

from __future__ import annotations

from functools import partial

from ..scores import d3_scores
from .base import SelectionMethod, register_method


@register_method("id3")
class ID3(SelectionMethod):
    incremental = True

    def on_step(self, k: int) -> bool:
        if k <= 0:
            return True
        config = self.engine.config
        return self.engine.select_top(k, partial(d3_scores, eps=config.eps, exp=config.exp))
