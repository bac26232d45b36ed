"""static-S: the B highest D3 scores on the first step's gradients, fixed for the rest of training."""

from __future__ import annotations

from functools import partial

from ..scores import d3_scores
from .base import Selection, SelectionMethod, StepContext, register_method


@register_method("static")
class StaticD3(SelectionMethod):
    """Chooses the whole budget at the first optimizer step (the first gradients), ignores the scheduler.

    A step whose fp16 gradients overflowed chooses nothing, so the choice moves to the next step.

    Example:
        >>> ID3Config(method="static", budget=1000)  # doctest: +SKIP
    """

    incremental = False

    def on_step(self, ctx: StepContext) -> Selection | None:
        if ctx.unmasked:
            return None
        config = self.engine.config
        score_fn = partial(d3_scores, eps=config.eps, exp=config.exp)
        scores, index = ctx.scan.top_by_gradient(ctx.budget, score_fn, ctx.grad_scale)
        return Selection(index, scores)

    def describe(self) -> str:
        return "static-S: top-B by D3 on the first step's gradients, fixed afterwards"
