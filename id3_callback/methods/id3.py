"""ID3 (increment-S with D3): each step, the k highest D3 scores among still-masked entries join the set."""

from __future__ import annotations

from functools import partial

from ..scores import d3_scores
from .base import Selection, SelectionMethod, StepContext, register_method


@register_method("id3")
class ID3(SelectionMethod):
    """The paper's method: D3 scores |g| / (|theta| + eps)^exp, the k best masked entries each step.

    Example:
        >>> ID3Config(method="id3", budget=1000)  # doctest: +SKIP
    """

    incremental = True

    def score_fn(self):
        """The score `on_step` ranks by; the engine's low-memory mode scores with it in gradient hooks."""
        config = self.engine.config
        return partial(d3_scores, eps=config.eps, exp=config.exp)

    def on_step(self, ctx: StepContext) -> Selection | None:
        if ctx.k <= 0:
            return None
        scores, index = ctx.scan.top_by_gradient(ctx.k, self.score_fn(), ctx.grad_scale)
        return Selection(index, scores)
