"""Adapter around the paper's official toolkit, ``selective-optimizers`` (PyPI, v0.4).

Benchmark-only, optional dependency.  Nothing from the official package is copied here: it is
imported lazily inside the functions below, so importing this module never fails when the
package is absent.  Install it without touching the main environment, e.g.::

    pip install --no-deps --target /tmp/so-site selective-optimizers==0.4
    PYTHONPATH=/tmp/so-site python your_benchmark.py

(the wheel declares no dependencies; it only needs torch).

Known behaviours of the official v0.4 ID3 optimizer that matter for a fair comparison
(all reproduced on torch 2.13 / transformers 5.24):

* It is a subclass of the base torch optimizer (``get_selective_optimizer(AdamW, "id3")``),
  keeps dense boolean masks plus dense Adam state for every trainable tensor, zeroes the
  gradients of unselected entries and then runs the ordinary dense base ``step()``.
* ``global_step`` is never incremented in v0.4, so the "one extra entry for the first
  ``budget % max_steps`` steps" rule is applied at *every* step: whenever ``budget`` is not a
  multiple of ``max_steps`` it unmasks ``max_steps - budget % max_steps`` entries too many.  It
  also keeps unmasking after ``max_steps`` steps.  ``fix_step_counter=True`` (default here)
  increments the counter after each step, which gives the uniform schedule of the paper and of
  the toolkit's earlier source; pass ``False`` for the verbatim v0.4 behaviour.
* ``weight_decay`` given as a keyword is forced to 0.0 (it prints a message).  A per-group
  ``weight_decay`` (what the HF Trainer builds) is *not* overridden and decays every entry,
  breaking the budget; this adapter therefore always uses a single parameter group.
* Its ``eps`` keyword is the D3 epsilon; AdamW's own ``eps`` cannot be set and stays 1e-8.
* The Adam step counter is per tensor, so an entry unmasked late gets bias corrections for the
  tensor's age, not its own (first update ~0.5x lr around step 10, ~2.5x lr at step 1000).
* A trainable parameter whose ``.grad`` is None makes its ``step()`` crash; this adapter fills
  such gradients with zeros first (zero gradient means metric 0 and no update).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import warnings
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["official_available", "make_official_id3", "count_changed", "OfficialID3"]


def official_available() -> bool:
    """True when ``selective_optimizers`` (the official toolkit) can be imported."""
    try:
        if importlib.util.find_spec("selective_optimizers") is None:
            return False
        importlib.import_module("selective_optimizers.wrap")
    except Exception:  # broken or partial install counts as absent
        return False
    return True


def _fused_ok(params) -> bool:
    for p in params:
        if p.device.type not in ("cpu", "cuda") or not torch.is_floating_point(p):
            return False
    return True


class OfficialID3:
    """Thin plain-loop wrapper around an official ``Id3`` optimizer instance.

    ``optimizer`` is the official object itself (a ``torch.optim.AdamW`` subclass), usable with
    LR schedulers and with the official ``get_summary`` / ``post_train_work`` helpers.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, params, total_steps: int, budget: int, fix_step_counter: bool
    ) -> None:
        self.optimizer = optimizer
        self.params = list(params)
        self.total_steps = int(total_steps)
        self.budget = int(budget)
        self.fix_step_counter = bool(fix_step_counter)
        self.steps_taken = 0
        self._warned_overrun = False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        if self.steps_taken >= self.total_steps and not self._warned_overrun:
            warnings.warn(
                f"official ID3: step {self.steps_taken + 1} > total_steps={self.total_steps}; the official "
                "optimizer keeps unmasking entries past its schedule, so the budget will be exceeded",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned_overrun = True
        for p in self.params:  # the official step dereferences .grad of every trainable tensor
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.steps_taken += 1
        if self.fix_step_counter:
            self.optimizer.global_step += 1

    def budget_used(self) -> int:
        """Number of entries the official masks mark as selected."""
        return int(self.optimizer.get_budget_used())

    def state_bytes(self) -> int:
        """Bytes held by the official optimizer: dense Adam state tensors plus the boolean masks."""
        total = 0
        for st in self.optimizer.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
        for g in self.optimizer.param_groups:
            for m in g.get("chosen_masks", []):
                if m is not None:
                    total += m.numel() * m.element_size()
        return total


def make_official_id3(
    model: torch.nn.Module,
    budget: int,
    total_steps: int,
    lr: float,
    weight_decay: float = 0.0,
    eps: float = 1e-3,
    exp: float = 1.0,
    *,
    fused: bool = True,
    fix_step_counter: bool = True,
) -> OfficialID3:
    """Build the official ID3 optimizer (AdamW base) for a plain PyTorch training loop.

    Every trainable parameter of ``model`` goes into one group, all entries selectable (no
    ``choose_all`` group), ``budget`` entries unmasked uniformly over ``total_steps`` steps with
    the D3 metric ``|g| / (eps + |theta|) ** exp``.  ``weight_decay`` is handed to the official
    constructor, which forces it to 0.0.  ``verify=False`` so it writes no copy of the model to
    /tmp (use :func:`count_changed` instead).  ``fused`` selects ``AdamW(fused=True)`` as the base
    step when every parameter is a floating tensor on CPU or CUDA.
    """
    if not official_available():
        raise ImportError(
            "selective_optimizers (the official ID3 toolkit) is not importable; "
            "install it with `pip install --no-deps selective-optimizers==0.4`"
        )
    wrap = importlib.import_module("selective_optimizers.wrap")
    budget, total_steps = int(budget), int(total_steps)
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if budget < total_steps:
        raise ValueError(f"the official ID3 needs budget >= total_steps (got {budget} < {total_steps})")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    cls = wrap.get_selective_optimizer(torch.optim.AdamW, "id3")
    kwargs: dict[str, Any] = dict(
        lr=lr, weight_decay=weight_decay, budget=budget, max_steps=total_steps, eps=eps, exp=exp, verify=False
    )
    if fused and _fused_ok(params):
        kwargs["fused"] = True
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # it prints its weight-decay override
        opt = cls(params, **kwargs)
    if out.getvalue().strip():
        warnings.warn("official ID3: " + out.getvalue().strip(), RuntimeWarning, stacklevel=2)
    return OfficialID3(opt, params, total_steps, budget, fix_step_counter)


def count_changed(model_before_state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> int:
    """Number of parameter entries of ``model`` that differ from ``model_before_state_dict``.

    The snapshot must be a copy taken before training, e.g.
    ``{k: v.detach().clone() for k, v in model.state_dict().items()}`` (a bare ``state_dict()``
    shares storage with the live parameters).  Tied parameters are counted once; buffers are
    ignored; parameters missing from the snapshot raise ``KeyError``.
    """
    changed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            before = model_before_state_dict[name]
            if before.shape != p.shape:
                raise ValueError(f"shape mismatch for {name}: {tuple(before.shape)} vs {tuple(p.shape)}")
            if before.device == p.device and before.numel() and before.data_ptr() == p.data_ptr():
                raise ValueError(
                    f"snapshot for {name} shares storage with the live parameter; "
                    "clone the state dict before training"
                )
            changed += int((p.detach() != before.to(p.device, p.dtype)).sum().item())
    return changed
