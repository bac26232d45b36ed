"""The unmasked set: which entries of which tensors may change, stored as O(B) flat indices.

Indices are kept in the order entries joined, so optimizer state can simply grow at the end. Dense tensors
(e.g. a new classifier head) are trained fully and have no index list. When an entry joins, its current
value is recorded: masked entries never change, so that value is the base model's, which gives deltas a
checksum of what they overwrite without keeping a dense copy of the model.

Two extensions serve the other selection methods: `replace` (repeat-S swaps a tensor's whole set each step)
keeps the first-seen base value of every entry that ever left the set, so deltas cover the union of trained
entries (O(union) memory); `unmask_all` (full fine-tuning) marks a whole tensor trainable with no index list.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable

import torch
from torch import nn

from .io import _sha  # the same checksum `apply_delta` verifies
from .sparse_grads import as_coalesced, mask_rows_


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
        # Selectable tensors unmasked whole (method 'full'): name -> SHA-256 of the base values, no index list.
        self.full: dict[str, str] = {}
        # Entries that left the set through `replace`: name -> (sorted indices, first-seen base values).
        self.retired: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._listeners: list[weakref.WeakMethod] = []
        # Low-memory mode frees dense gradients during backward and keeps, per tensor, the gradient values of
        # its unmasked entries (in `indices` order) here; SparseAdamW reads them when `p.grad` is None.
        self.grad_stash: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.count

    def name_of(self, param: torch.Tensor) -> str | None:
        return self._name_of.get(id(param))

    def indices_for(self, param: torch.Tensor) -> torch.Tensor | None:
        """Flat indices of `param`'s unmasked entries; None means the whole tensor (dense)."""
        name = self._name_of.get(id(param))
        if name is None:
            return torch.empty(0, dtype=torch.long)
        return None if name in self.dense or name in self.full else self.indices[name]

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
        """Set tensor `name`'s unmasked entries to exactly `indices` (distinct flat indices; repeat-S).

        Entries leaving the set may already have moved, so their base values are kept (in `retired`), and an
        entry re-joining gets its first-seen base value back rather than its current one: deltas stay exact.
        Subscribers (`SparseAdamW`) are told, so they can carry optimizer state over for entries that stay.
        """
        p = self.params[name]
        old = self.indices[name]
        new = indices.to(device=old.device, dtype=torch.long).reshape(-1)
        if new.numel() == old.numel() and torch.equal(torch.sort(new).values, torch.sort(old).values):
            return  # same set: keep its order, nothing to tell the optimizer
        pool_idx, pool_base = old, self.base_values[name]
        if name in self.retired:
            pool_idx = torch.cat([pool_idx, self.retired[name][0]])
            pool_base = torch.cat([pool_base, self.retired[name][1]])
        order = torch.argsort(pool_idx)
        pool_idx, pool_base = pool_idx[order], pool_base[order]
        # Masked entries never change, so for never-seen entries the current value is the base value.
        new_base = p.detach().reshape(-1)[new]
        stay = torch.ones(pool_idx.numel(), dtype=torch.bool, device=old.device)
        if pool_idx.numel():
            pos = torch.searchsorted(pool_idx, new).clamp_(max=pool_idx.numel() - 1)
            seen = pool_idx[pos] == new
            new_base[seen] = pool_base[pos[seen]]
            stay[pos[seen]] = False
        if bool(stay.any()):
            self.retired[name] = (pool_idx[stay], pool_base[stay])
        else:
            self.retired.pop(name, None)
        for ref in list(self._listeners):
            callback = ref()
            if callback is None:
                self._listeners.remove(ref)
            else:
                callback(p, old, new)
        self.indices[name], self.base_values[name] = new, new_base
        self.count += new.numel() - old.numel()

    def subscribe(self, callback: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> None:
        """Call bound method `callback(param, old_indices, new_indices)` on every `replace` (held weakly)."""
        self._listeners.append(weakref.WeakMethod(callback))

    def unmask_all(self, name: str) -> None:
        """Unmask every entry of selectable tensor `name` with no index list (full fine-tuning).

        Like a dense tensor it is trained whole; only a checksum of its base values is kept, for deltas.
        """
        if self.indices[name].numel() or name in self.full:
            raise ValueError(f"{name} already has unmasked entries; unmask_all needs an untouched tensor.")
        self.full[name] = _sha(self.params[name])
        self.count += self.params[name].numel()

    def trained_indices(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted flat indices, base values) of every entry of `name` ever unmasked: what a delta stores."""
        if name not in self.retired:
            return self.sorted_indices(name)
        idx = torch.cat([self.indices[name], self.retired[name][0]])
        base = torch.cat([self.base_values[name], self.retired[name][1]])
        order = torch.argsort(idx)
        return idx[order], base[order]

    @torch.no_grad()
    def mask_gradients(self, nonzero_rows: dict[str, torch.Tensor] | None = None) -> None:
        """Zero the gradients of masked entries; tensors with nothing unmasked get `grad = None`.

        `nonzero_rows` (name -> row indices) says which rows of a gradient may hold a nonzero bit, as found
        by `selection.nonzero_rows` on this very gradient: every other row is already +0.0, so only those
        rows are zeroed (an embedding's 138 rows instead of all 30,522), with a bitwise equal result.
        A row-sparse gradient (`ID3Config.sparse_embedding_grads`) stays sparse: its rows' values are zeroed
        except at unmasked entries.
        """
        masked, zero_whole = [], []
        for name, p in self.params.items():
            if p.grad is None or name in self.full:
                continue
            idx = self.indices[name]
            if idx.numel() == 0:
                p.grad = None
            elif idx.numel() < p.numel() and p.grad.is_sparse:  # row-sparse: only its few rows hold values
                p.grad = as_coalesced(p.grad)
                mask_rows_(p.grad, idx)
            elif idx.numel() < p.numel():
                flat = p.grad.view(-1)
                masked.append((flat, idx, flat[idx]))
                rows = None if nonzero_rows is None else nonzero_rows.get(name)
                if rows is None:
                    zero_whole.append(flat)
                else:
                    p.grad.view(p.grad.shape[0], -1).index_fill_(0, rows, 0.0)
        if zero_whole:  # one zeroing call for every tensor zeroed in full
            torch._foreach_zero_(zero_whole)
        for flat, idx, kept in masked:  # then the kept values back
            flat.index_copy_(0, idx, kept)

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
            h.update(b"<all>" if name in self.full else idx.cpu().numpy().tobytes())
        return h.hexdigest()

    def per_tensor_counts(self) -> dict[str, int]:
        return {
            name: self.params[name].numel() if name in self.full else idx.numel()
            for name, idx in self.indices.items()
        }

    def state_dict(self) -> dict:
        return {
            "indices": {n: i.cpu() for n, i in self.indices.items()},
            "base_values": {n: v.cpu() for n, v in self.base_values.items()},
            "dense_base": {n: v.cpu() for n, v in self.dense_base.items()},
            "full": dict(self.full),
            "retired": {n: (i.cpu(), v.cpu()) for n, (i, v) in self.retired.items()},
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
        self.full = dict(state.get("full", {}))
        self.retired = {
            n: (i.to(self.params[n].device), v.to(self.params[n].device))
            for n, (i, v) in state.get("retired", {}).items()
        }
        self.count = sum(i.numel() for i in self.indices.values())
        self.count += sum(self.params[n].numel() for n in self.full)
