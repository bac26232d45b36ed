"""BitFit: every selectable bias (parameters whose name ends with 'bias'), fixed."""

from __future__ import annotations

import torch

from .base import SelectionMethod, register_method
from .common import fixed_budget


@register_method("bitfit")
class BitFit(SelectionMethod):
    """Trains the bias terms only; the budget becomes their entry count (a warning says so if it differs).

    Example:
        >>> ID3Config(method="bitfit")  # doctest: +SKIP
    """

    incremental = False

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.biases = [name for name in engine.unmasked.params if name.endswith("bias")]
        if not self.biases:
            raise ValueError(
                "method 'bitfit' found no selectable parameter whose name ends with 'bias' (selectable: "
                f"{list(engine.unmasked.params)[:5]}...). Unfreeze the biases or adjust include/exclude/dense."
            )
        count = sum(engine.unmasked.params[name].numel() for name in self.biases)
        fixed_budget(engine, count, "bitfit", f"the {len(self.biases)} selectable bias tensors")

    def on_start(self) -> None:
        for name in self.biases:
            p = self.engine.unmasked.params[name]
            self.engine.unmasked.add(name, torch.arange(p.numel(), device=p.device))

    def describe(self) -> str:
        return f"BitFit: {len(self.biases)} bias tensors; budget = their {self.engine.budget:,} entries"
