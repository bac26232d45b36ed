"""BitFit: every selectable bias (parameters whose name ends with 'bias'), fixed."""

from __future__ import annotations

import torch

from .base import Selection, SelectionMethod, StepContext, register_method


@register_method("bitfit")
class BitFit(SelectionMethod):
    """Trains the bias terms only; the budget becomes their entry count (a warning says so if it differs).

    Example:
        >>> ID3Config(method="bitfit")  # doctest: +SKIP
    """

    incremental = False

    def __init__(self, engine) -> None:
        super().__init__(engine)
        params = engine.unmasked.params
        self.biases = [name for name in params if name.endswith("bias")]
        if not self.biases:
            raise ValueError(
                "method 'bitfit' found no selectable parameter whose name ends with 'bias' (selectable: "
                f"{list(params)[:5]}...). Unfreeze the biases or adjust include/exclude/dense."
            )
        self.entries = sum(params[name].numel() for name in self.biases)

    def budget_override(self) -> tuple[int, str]:
        return self.entries, f"the {len(self.biases)} selectable bias tensors"

    def on_start(self, ctx: StepContext) -> Selection:
        params, offsets = self.engine.unmasked.params, ctx.scan.offsets
        index = [torch.arange(params[n].numel(), device=params[n].device) + offsets[n] for n in self.biases]
        return Selection(torch.cat(index))

    def describe(self) -> str:
        return f"BitFit: {len(self.biases)} bias tensors; budget = their {self.entries:,} entries"
