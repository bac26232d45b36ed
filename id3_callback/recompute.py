"""Pointwise recomputation: a saved activation that is a product or an activation function of tensors autograd
keeps anyway is stored as that recipe and recomputed in backward.

Every method that scores all weights needs every weight's gradient, so autograd keeps the input of every
weight-bearing op. In a Llama block three of them are one elementwise op away from tensors the graph holds
regardless: the normed hidden states `x * rsqrt(var)` twice (kept for the norm weights' gradients; `x` and
`rsqrt(var)` are kept by the ops that made them) and the MLP's `silu(gate)` (kept for `down_proj`'s input
product; `gate` is kept by the SiLU). LoRA on q/v keeps the SiLU output too, but not the normed states.
A saved-tensor hook
(`torch.autograd.graph.saved_tensors_hooks`) sees each tensor as autograd saves it; when its producer is
`mul`, `silu` or `gelu` and the producer kept its own inputs, it stores (op, inputs) instead, and backward
reruns that one op. The recomputation is the same kernel on the same inputs, so gradients are bitwise the
ones without it (`tests/test_recompute.py`); a recipe whose inputs are recipes themselves is not made
(nothing would be saved), so each recomputation is one op.

Unlike activation checkpointing it recomputes no block, needs no model support and changes no model
code path. It works in any model; install it around the forward with `PointwiseRecompute(model)`.

Example:
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    >>> recompute = PointwiseRecompute(model)
    >>> model(torch.randn(4, 8)).sum().backward()
    >>> recompute.recipes   # silu's output, the second Linear's input, was stored as silu(first output)
    1
    >>> recompute.remove()
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _mul(node) -> tuple[Callable, tuple]:
    return torch.mul, (node._saved_self, node._saved_other)


def _silu(node) -> tuple[Callable, tuple]:
    return F.silu, (node._saved_self,)


def _gelu(node) -> tuple[Callable, tuple]:
    approximate = node._saved_approximate
    return (lambda x: F.gelu(x, approximate=approximate)), (node._saved_self,)


# Producer (autograd node) -> how to read the op and the inputs it kept. Ops whose node keeps its output
# rather than its inputs (tanh, sigmoid, relu) or nothing (add) cannot be recomputed from kept tensors.
RECIPES: dict[str, Callable] = {"MulBackward0": _mul, "SiluBackward0": _silu, "GeluBackward0": _gelu}


class _Recipe:
    __slots__ = ("op", "inputs", "versions", "layout", "view")

    def __init__(self, op: Callable, inputs: tuple, base: torch.Tensor, tensor: torch.Tensor) -> None:
        self.op, self.inputs = op, inputs
        self.versions = tuple(t._version for t in inputs)
        self.layout = (base.shape, base.stride())
        # A view (a linear layer's 2-D input, say) is taken again from the recomputed base.
        self.view = None if tensor is base else (tensor.shape, tensor.stride(), tensor.storage_offset())

    def __call__(self) -> torch.Tensor:
        base = self.op(*self.inputs)
        if (base.shape, base.stride()) != self.layout:
            raise RuntimeError(
                f"a recomputed activation came out with another layout: {self.layout} -> "
                f"{(base.shape, base.stride())}; set ID3Config(recompute_pointwise=False)."
            )
        return base if self.view is None else base.as_strided(*self.view)


class _IsRecipe(Exception):
    """Raised by `unpack` while a recipe is being made: that input is not a kept tensor."""


class PointwiseRecompute:
    """Store cheap saved activations of `model`'s forwards as recipes (see the module docstring).

    Installs a forward pre-hook and a forward hook on `model` that wrap each forward in the saved-tensor
    hooks; `remove()` uninstalls them. `recipes` and `kept` count the tensors stored each way so far,
    `forwards` the forwards seen.
    """

    def __init__(self, model: nn.Module) -> None:
        self.recipes, self.kept, self.forwards = 0, 0, 0
        self.warned = False  # ID3Engine warns once if no forward passed through the hooks
        self._local = threading.local()  # per thread: the hooks' context stack, and whether we are probing
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __deepcopy__(self, memo: dict) -> PointwiseRecompute:
        # copy.deepcopy(model) copies the model's hooks, and with them their owner; its state is per thread
        # and per forward, not per model, so the copy shares it (a thread-local cannot be copied anyway).
        return self

    def _enter(self, module: nn.Module, args) -> None:
        self.forwards += 1
        context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        context.__enter__()
        self._stack().append(context)

    def _exit(self, module: nn.Module, args, output) -> None:
        stack = self._stack()
        if stack:
            stack.pop().__exit__(None, None, None)

    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def _pack(self, tensor: torch.Tensor):
        base = tensor if tensor._base is None else tensor._base
        node = base.grad_fn
        read = RECIPES.get(type(node).__name__) if node is not None else None
        if read is not None:
            self._local.probing = True
            try:
                op, inputs = read(node)
            except Exception:  # an input was not kept (it needs no gradient), or it is a recipe itself
                inputs = None
            finally:
                self._local.probing = False
            if inputs is not None and all(isinstance(t, torch.Tensor) for t in inputs):
                self.recipes += 1
                return _Recipe(op, inputs, base, tensor)
        self.kept += 1
        return tensor

    def _unpack(self, packed):
        if not isinstance(packed, _Recipe):
            return packed
        if getattr(self._local, "probing", False):
            raise _IsRecipe
        if tuple(t._version for t in packed.inputs) != packed.versions:
            raise RuntimeError(
                "an input of a recomputed activation was modified in place after the forward: set "
                "ID3Config(recompute_pointwise=False) (or remove PointwiseRecompute) for this model."
            )
        # No graph of its own: autograd gives an unpacked tensor the saved one's history, which is what a
        # second derivative (create_graph=True) follows (tested).
        with torch.no_grad():
            return packed()
