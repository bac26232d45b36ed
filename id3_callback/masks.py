"""The unmasked set: which entries of which tensors may change, stored as O(B) flat indices.

Indices are kept in the order entries joined, so optimizer state can simply grow at the end. Dense tensors
(e.g. a new classifier head) are trained fully and have no index list. When an entry joins, its current
value is recorded: masked entries never change, so that value is the base model's, which gives deltas a
checksum of what they overwrite without keeping a dense copy of the model.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


class UnmaskedSet:
    """Per-tensor flat indices of the entries that may be trained.

    Example:
        >>> w = nn.Parameter(torch.zeros(2, 3))
        >>> s = UnmaskedSet({"w": w})
        >>> s.add("w", torch.tensor([4, 1]))
        >>> len(s), s.indices["w"].tolist()
        (2, [4, 1])
    """

    def __init__(self, params: dict[str, nn.Parameter], dense: dict[str, nn.Parameter] | None = None) -> None:
        self.params = params
        self.dense = dense or {}
        self.indices: dict[str, torch.Tensor] = {
            name: torch.empty(0, dtype=torch.long, device=p.device) for name, p in params.items()
        }
        self.base_values: dict[str, torch.Tensor] = {
            name: torch.empty(0, dtype=p.dtype, device=p.device) for name, p in params.items()
        }
        # Dense tensors change everywhere, so their base values are copied once, up front.
        self.dense_base: dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in self.dense.items()}
        self._name_of = {id(p): n for n, p in [*params.items(), *self.dense.items()]}
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def name_of(self, param: torch.Tensor) -> str | None:
        return self._name_of.get(id(param))

    def indices_for(self, param: torch.Tensor) -> torch.Tensor | None:
        """Flat indices of `param`'s unmasked entries; None means the whole tensor (dense)."""
        name = self._name_of.get(id(param))
        if name is None:
            return torch.empty(0, dtype=torch.long)
        return None if name in self.dense else self.indices[name]

    def add(self, name: str, new: torch.Tensor) -> None:
        """Unmask `new` (flat indices, all currently masked) in tensor `name`."""
        if new.numel() == 0:
            return
        new = new.to(device=self.indices[name].device, dtype=torch.long)
        flat = self.params[name].detach().reshape(-1)
        self.indices[name] = torch.cat([self.indices[name], new])
        self.base_values[name] = torch.cat([self.base_values[name], flat[new]])
        self.count += new.numel()

    def replace(self, name: str, indices: torch.Tensor) -> None:
        """Set tensor `name`'s unmasked entries to exactly `indices` (used by repeat-S)."""
        self.count -= self.indices[name].numel()
        self.indices[name] = self.indices[name][:0]
        self.base_values[name] = self.base_values[name][:0]
        self.add(name, indices)

    def exclude_unmasked_(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """Mark already-unmasked entries of `name` ineligible in a flat score tensor, in place."""
        idx = self.indices[name]
        if idx.numel():
            scores.index_fill_(0, idx, float("-inf"))
        return scores

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of masked entries; tensors with nothing unmasked get `grad = None`."""
        for name, p in self.params.items():
            if p.grad is None:
                continue
            idx = self.indices[name]
            if idx.numel() == 0:
                p.grad = None
            elif idx.numel() < p.numel():
                flat = p.grad.view(-1)
                kept = flat[idx]
                flat.zero_()
                flat[idx] = kept

    def sorted_indices(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted flat indices, base values in that order) of tensor `name`."""
        order = torch.argsort(self.indices[name])
        return self.indices[name][order], self.base_values[name][order]

    def fingerprint(self) -> str:
        """A hash of the set (independent of insertion order) to compare runs or ranks."""
        h = hashlib.sha256()
        for name in sorted(self.params):
            idx, _ = self.sorted_indices(name)
            h.update(name.encode())
            h.update(idx.cpu().numpy().tobytes())
        return h.hexdigest()

    def per_tensor_counts(self) -> dict[str, int]:
        return {name: idx.numel() for name, idx in self.indices.items()}

    def state_dict(self) -> dict:
        return {
            "indices": {n: i.cpu() for n, i in self.indices.items()},
            "base_values": {n: v.cpu() for n, v in self.base_values.items()},
            "dense_base": {n: v.cpu() for n, v in self.dense_base.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["indices"]) != set(self.params):
            missing = sorted(set(self.params) ^ set(state["indices"]))[:5]
            raise ValueError(
                f"saved unmasked set covers other tensors than this model's selectable ones (e.g. {missing}): "
                "resume with the same model and the same include/exclude/dense settings."
            )
        for name, p in self.params.items():
            self.indices[name] = state["indices"][name].to(p.device)
            self.base_values[name] = state["base_values"][name].to(p.device)
        for name, p in self.dense.items():
            self.dense_base[name] = state["dense_base"][name].to(p.device)
        self.count = sum(i.numel() for i in self.indices.values())
