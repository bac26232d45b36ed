"""repeat-S: a fresh top-B by D3 every step; only those B entries update at that step.

Optimizer state: `SparseAdamW` keeps the moments and step count of entries that stay in the set from one
step to the next and starts re-joining entries fresh (it drops an entry's state when it leaves). This keeps
optimizer memory O(B) and treats each stay in the set as one Adam run, like an entry joining ID3's set late.
Restarting everyone every step would instead turn Adam into sign descent (a first bias-corrected Adam step
is lr * sign(g)); keeping state for every entry ever selected would make memory O(union).

Deltas cover the union of entries ever trained, each with its first-seen base value (`UnmaskedSet.replace`).
"""

from __future__ import annotations

from functools import partial

from ..scores import d3_scores
from .base import Selection, SelectionMethod, StepContext, register_method


@register_method("repeat")
class RepeatD3(SelectionMethod):
    """Every step, the set becomes the B highest D3 scores over all selectable entries (set included).

    Example:
        >>> ID3Config(method="repeat", budget=1000)  # doctest: +SKIP
    """

    incremental = False
    sparse_grads = False  # scores every p.grad through push_flat, which reads it dense

    def __init__(self, engine) -> None:
        super().__init__(engine)
        if engine.config.optimizer != "sparse_adamw":
            raise ValueError(
                "method 'repeat' needs optimizer='sparse_adamw': a standard optimizer keeps moving entries that "
                "left the set with their leftover momentum. Set ID3Config(optimizer='sparse_adamw')."
            )

    def on_step(self, ctx: StepContext) -> Selection:
        # Every entry competes, the set included; a tensor without a gradient counts as zero gradients. The
        # scorer's D3 shortcuts (gradient bound, candidates found from the gradient alone) apply as for ID3.
        # fp16 loss scaling multiplies every score alike, so the ranking needs no unscaling. On an overflow
        # the engine keeps last step's set (the optimizer skips the step).
        config = self.engine.config
        scores, index = ctx.scan.top_of_every_entry(
            ctx.budget, partial(d3_scores, eps=config.eps, exp=config.exp)
        )
        return Selection(index, scores, replace=True)

    def describe(self) -> str:
        return "repeat-S: a fresh top-B by D3 every step (deltas hold every entry ever trained)"
