"""Optimizers that respect the unmasked set.

`SparseAdamW` keeps Adam's moments and step count only for unmasked entries (O(B) memory) and gives each
entry its own step count, so an entry unmasked at step 900 takes exactly the first step a fresh Adam would
(a dense Adam would bias-correct it as if it had 900 steps of history, shrinking its early updates).

`guard_weight_decay` makes any standard optimizer safe: it moves weight decay out of the optimizer and
applies it to unmasked entries only, so masked entries stay bit-identical with decay switched on.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .masks import UnmaskedSet
from .sparse_grads import gather_entries


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over the unmasked entries only, with per-entry bias correction.

    Example (a plain PyTorch loop; `engine` is an `ID3Engine`):
        >>> opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-4, weight_decay=0.01)  # doctest: +SKIP
        >>> loss.backward(); engine.step(); opt.step(); opt.zero_grad()                          # doctest: +SKIP
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        unmasked: UnmaskedSet,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid SparseAdamW hyperparameters: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.unmasked = unmasked
        unmasked.subscribe(self._on_replace)

    @torch.no_grad()
    def _on_replace(self, p: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
        """The set of `p` was swapped (repeat-S): entries that stay keep their moments and step count,
        entries that join start fresh, entries that leave drop theirs (O(B) state, as for a growing set)."""
        state = self.state.get(p)
        if not state:
            return
        have = state["exp_avg"].numel()  # state covers the first `have` entries of `old`
        known, order = torch.sort(old[:have])
        src = torch.full_like(new, -1)
        if have:
            pos = torch.searchsorted(known, new).clamp_(max=have - 1)
            hit = known[pos] == new
            src[hit] = order[pos[hit]]
        hit = src >= 0
        for key in ("exp_avg", "exp_avg_sq", "step"):
            fresh = torch.zeros(new.numel(), dtype=state[key].dtype, device=state[key].device)
            fresh[hit] = state[key][src[hit]]
            state[key] = fresh

    def _state_for(self, p: torch.Tensor, n: int) -> dict:
        """State of `p` sized for its first `n` unmasked entries; new entries start fresh (zeros, step 0)."""
        state = self.state[p]
        have = state["exp_avg"].numel() if state else 0
        if have < n:
            grow = n - have
            zeros = torch.zeros(grow, dtype=p.dtype, device=p.device)
            if not state:
                state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
                state["step"] = torch.zeros(grow, dtype=torch.float32, device=p.device)
            else:
                state["exp_avg"] = torch.cat([state["exp_avg"], zeros])
                state["exp_avg_sq"] = torch.cat([state["exp_avg_sq"], zeros])
                state["step"] = torch.cat([state["step"], zeros.float()])
        elif have > n:
            # Only if the set was swapped behind our back (`_on_replace` normally keeps n in step).
            state.clear()
            return self._state_for(p, n)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            batch: dict[tuple, list] = {}  # tensors with an index list, updated together per device/dtype
            for p in group["params"]:
                idx = self.unmasked.indices_for(p)
                grad = self._grad_values(p, idx)
                if grad is None:
                    continue
                if idx is None:  # dense tensor: every entry, in place
                    self._adamw(group, p.view(-1), grad, self._state_for(p, p.numel()))
                else:
                    batch.setdefault((p.device, p.dtype), []).append((p, idx, grad))
            for items in batch.values():
                self._step_sparse(group, items)
        return loss

    def _grad_values(self, p: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor | None:
        """The gradient of `p`'s trainable entries (flat), or None if it has none this step.

        Without `p.grad` (the low-memory mode freed it), the values kept by the engine are used.
        """
        if idx is not None and idx.numel() == 0:
            return None
        if p.grad is not None:
            if p.grad.is_sparse:  # a row-sparse embedding gradient (ID3Config.sparse_embedding_grads)
                return p.grad.to_dense().reshape(-1) if idx is None else gather_entries(p.grad, idx)
            flat = p.grad.reshape(-1)
            return flat if idx is None else flat[idx]
        name = self.unmasked.name_of(p)
        stash = self.unmasked.grad_stash.pop(name, None) if name is not None else None
        if stash is None or idx is None:
            return None
        if stash.numel() != idx.numel():
            raise RuntimeError(
                f"the kept gradient of {name} covers {stash.numel()} entries but {idx.numel()} are unmasked: "
                "call engine.step() after each backward and before optimizer.step()."
            )
        return stash

    def _step_sparse(self, group: dict, items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """One AdamW update over the unmasked entries of many tensors, concatenated into flat buffers.

        A few ops over O(B) entries instead of a dozen small ops per tensor: per-tensor work is only the
        gather and scatter. Entry-wise the arithmetic is the same as updating each tensor on its own.
        """
        sizes = [idx.numel() for _, idx, _ in items]
        states = [self._state_for(p, n) for (p, _, _), n in zip(items, sizes)]
        keys = ("exp_avg", "exp_avg_sq", "step")
        flat_state = {key: torch.cat([s[key] for s in states]) for key in keys}
        grad = torch.cat([g for _, _, g in items])
        weight = torch.cat([p.view(-1)[idx] for p, idx, _ in items])
        self._adamw(group, weight, grad, flat_state)
        parts = [flat_state[key].split(sizes) for key in keys]
        for i, ((p, idx, _), w) in enumerate(zip(items, weight.split(sizes))):
            p.view(-1)[idx] = w
            for key, part in zip(keys, parts):
                states[i][key] = part[i]

    @staticmethod
    def _adamw(group: dict, weight: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        """AdamW with per-entry bias correction, in place on `weight` and `state` (flat tensors)."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        step = state["step"].add_(1)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if wd:
            weight.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # Bias corrections from a table indexed by step count: pow runs once per distinct step, and an entry's
        # value does not depend on where it sits in the flat buffer (vectorized pow is not correctly rounded).
        steps = step.long()
        powers = torch.arange(
            int(steps.max()) + 1 if steps.numel() else 1, dtype=step.dtype, device=step.device
        )
        bias1 = (1 - torch.pow(beta1, powers))[steps]
        bias2_sqrt = (1 - torch.pow(beta2, powers)).sqrt_()[steps]
        denom = (exp_avg_sq.sqrt() / bias2_sqrt.to(weight.dtype)).add_(eps)
        weight.sub_((exp_avg / denom).mul_((lr / bias1).to(weight.dtype)))

    def state_bytes(self) -> int:
        """Bytes of optimizer state held (to compare with a dense AdamW's 2 x 4 bytes x N)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values())


# Optimizers whose decay is decoupled (p -= lr * wd * p) rather than an L2 term added to the gradient.
_DECOUPLED = ("AdamW", "Adafactor", "AdamWScheduleFree", "Lion")
_COUPLED = ("Adam", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "ASGD", "Adadelta")


def guard_weight_decay(optimizer: torch.optim.Optimizer, unmasked: UnmaskedSet) -> None:
    """Apply `optimizer`'s weight decay to unmasked entries only (a step pre-hook does it).

    Masked entries have zero gradient, so Adam/SGD/Adafactor/... leave them untouched, *except* for decay,
    which shrinks every weight. This strips decay from the param groups and re-applies it, in the
    optimizer's own form, only where the unmasked set allows.

    Example:
        >>> guard_weight_decay(torch.optim.AdamW(model.parameters(), weight_decay=0.1), unmasked)  # doctest: +SKIP
    """
    if getattr(optimizer, "_id3_decay_guarded", False):
        return
    cls = type(optimizer).__name__
    decays = []
    for group in optimizer.param_groups:
        wd = group.get("weight_decay", 0.0) or 0.0
        decays.append(wd)
        group["weight_decay"] = 0.0
    if not any(decays):
        optimizer._id3_decay_guarded = True
        return
    decoupled = optimizer.param_groups[0].get("decoupled_weight_decay")
    if decoupled is None:
        if cls in _DECOUPLED:
            decoupled = True
        elif cls in _COUPLED:
            decoupled = False
        else:
            raise ValueError(
                f"ID3 cannot tell how {cls} applies weight decay, so it cannot keep masked weights fixed: "
                "set weight_decay=0, or use ID3Config(optimizer='sparse_adamw')."
            )

    @torch.no_grad()
    def apply_decay(opt, args, kwargs):
        for group, wd in zip(opt.param_groups, decays):
            if not wd:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                idx = unmasked.indices_for(p)
                if decoupled:
                    factor = 1 - group["lr"] * wd
                    if idx is None:
                        p.mul_(factor)
                    elif idx.numel():
                        flat = p.view(-1)
                        flat[idx] = flat[idx] * factor
                else:  # L2: add wd * theta to the gradient where the entry is trainable
                    if idx is None:
                        p.grad.add_(p, alpha=wd)
                    elif idx.numel():
                        p.grad.view(-1).index_add_(0, idx, p.view(-1)[idx], alpha=wd)

    optimizer.register_step_pre_hook(apply_decay)
    optimizer._id3_decay_guarded = True


def choose_optimizer(choice: str, optim: str, default_optim: str, given: bool = False) -> tuple[str, str]:
    """Resolve `ID3Config.optimizer` under the Trainer: ('sparse_adamw' or 'trainer', why, for the summary).

    `optim` is `TrainingArguments.optim`, `default_optim` the Trainer's default for it, `given` whether an
    optimizer was passed to the Trainer (`optimizers=` or `optimizer_cls_and_kwargs=`). 'auto' reads the
    default AdamW as "no choice made" and takes SparseAdamW; any other choice of the user's is honoured.

    Example:
        >>> choose_optimizer("auto", "sgd", "adamw_torch_fused")[0]
        'trainer'
    """
    if choice == "sparse_adamw" and given:
        raise ValueError(
            "ID3Config(optimizer='sparse_adamw') conflicts with the optimizer passed to the Trainer: drop one of "
            "them (ID3Config(optimizer='auto') uses the one passed, with weight decay on unmasked entries only)."
        )
    sparse = "SparseAdamW (state for unmasked entries only, per-entry bias correction)"
    if choice == "sparse_adamw":
        unused = f"; TrainingArguments.optim={optim!r} is not used" if optim != default_optim else ""
        return "sparse_adamw", f"{sparse}, as ID3Config(optimizer='sparse_adamw') asks{unused}"
    if choice == "trainer" or given or optim != default_optim:
        source = "the optimizer passed to the Trainer" if given else f"TrainingArguments.optim={optim!r}"
        how = "ID3Config(optimizer='trainer')" if choice == "trainer" else "auto: the user's choice"
        return "trainer", f"{source} ({how}), weight decay on unmasked entries only"
    return "sparse_adamw", (
        f"{sparse}; auto: TrainingArguments.optim is the Trainer's default {optim!r} "
        "(ID3Config(optimizer='trainer') keeps it)"
    )
