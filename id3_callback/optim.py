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
            # The set shrank (repeat-S replaces it every step): restart every entry's moments.
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
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                idx = self.unmasked.indices_for(p)
                flat = p.view(-1)
                if idx is None:  # dense tensor: every entry, same code path
                    grad, weight = p.grad.reshape(-1), flat
                    n = flat.numel()
                else:
                    if idx.numel() == 0:
                        continue
                    grad, weight = p.grad.view(-1)[idx], flat[idx]
                    n = idx.numel()
                state = self._state_for(p, n)
                step = state["step"].add_(1)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if wd:
                    weight.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias1 = 1 - torch.pow(beta1, step)
                bias2_sqrt = (1 - torch.pow(beta2, step)).sqrt_()
                denom = (exp_avg_sq.sqrt() / bias2_sqrt.to(p.dtype)).add_(eps)
                weight.sub_((exp_avg / denom).mul_((lr / bias1).to(p.dtype)))
                if idx is not None:
                    flat[idx] = weight
        return loss

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
