"""Pointwise recomputation: saved activations stored as one-op recipes, bitwise the same gradients, less memory.

One row per model; every row runs the same checks: the forward keeps fewer bytes alive, the loss and every
gradient are bitwise the ones without recomputation, and the expected activations became recipes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_bert, tiny_llama, tiny_t5, token_batches
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from id3_callback import ID3Config, ID3Engine
from id3_callback.recompute import PointwiseRecompute


def llama_with_dropout():
    model = tiny_llama()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1  # a random op in the graph: the recipes must not disturb it
    return model


class SwiGLUNet(nn.Module):
    """A plain PyTorch model (no transformers): norm-like product, SiLU gate, tanh-GELU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)
        self.gate, self.up, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x, labels):
        x = self.inp(x)
        h = self.scale * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        h = self.down(nn.functional.silu(self.gate(h)) * self.up(h))
        logits = self.head(nn.functional.gelu(h, approximate="tanh"))
        return {"loss": nn.functional.cross_entropy(logits, labels)}


def plain_batch():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(8, 16, generator=g), "labels": torch.randint(0, 3, (8,), generator=g)}


# name: (model factory, batch factory, fewest recipes expected)
MODELS = {
    # per layer: x * rsqrt twice, silu(gate); plus the final norm's
    "llama": (llama_with_dropout, lambda: next(token_batches("lm", 1)), 2 * 3 + 1),
    # per layer: the GELU output (the output dense's input)
    "bert": (tiny_bert, lambda: next(token_batches("cls", 1)), 2),
    # T5's RMSNorm: hidden * rsqrt per sublayer (2 encoder x 2, 2 decoder x 3, 2 final norms)
    "t5": (tiny_t5, lambda: next(token_batches("s2s", 1)), 12),
    "plain": (SwiGLUNet, plain_batch, 3),
}


class LiveStorages(TorchDispatchMode):
    """Weak references to every storage an op allocates, to sum what is still alive later."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.existing = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata in self.existing:  # a view of a weight (detach, transpose): no new memory
                    continue
                self.storages.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        return out

    def live_bytes(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())


def run(name: str, recompute: bool):
    make, batch, _ = MODELS[name]
    model = make()
    model.train()
    hooks = PointwiseRecompute(model) if recompute else None
    torch.manual_seed(1)  # the same dropout masks in both runs
    with LiveStorages(model) as tracker:
        loss = model(**batch())["loss"]
    live = tracker.live_bytes()  # what the forward left alive: the graph's saved activations, mostly
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, live, hooks


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_gradients_bitwise_and_less_memory(name):
    loss0, grads0, live0, _ = run(name, recompute=False)
    loss1, grads1, live1, hooks = run(name, recompute=True)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for n in grads0:
        assert torch.equal(grads0[n], grads1[n]), n
    assert hooks.recipes >= MODELS[name][2]
    assert live1 < live0, (live0, live1)


def test_the_memory_saved_is_the_recipes_tensors():
    # Llama: each recipe replaces one hidden-sized or MLP-sized fp32 tensor (batch 4 x 12 tokens)
    *_, live0, _ = run("llama", recompute=False)
    *_, live1, hooks = run("llama", recompute=True)
    tokens, hidden, mlp = 4 * 12, 32, 48
    per_layer = 4 * tokens * (2 * hidden + mlp)
    assert live0 - live1 == 2 * per_layer + 4 * tokens * hidden  # two layers and the final norm


def test_hooks_leave_with_remove_and_no_grad_forwards_pass_through():
    model, batch = tiny_llama(), next(token_batches("lm", 1))
    hooks = PointwiseRecompute(model)
    with torch.no_grad():
        model(**batch)
    assert hooks.recipes == 0 and hooks.kept == 0  # nothing is saved without a graph
    hooks.remove()
    model(**batch).loss.backward()
    assert hooks.recipes == 0
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_an_input_changed_in_place_is_an_error_naming_the_fix():
    lin = nn.Linear(4, 4)

    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x):
            a = x * 2.0
            b = a * x  # a recipe of (a, x)
            out = self.lin(b).sum()
            a.add_(1.0)  # the recipe's input changes before backward
            return out

    model, x = Bad(), torch.randn(3, 4, requires_grad=True)
    PointwiseRecompute(model)
    out = model(x)
    with pytest.raises(RuntimeError, match="recompute_pointwise=False"):
        out.backward()


def test_an_exception_in_forward_does_not_leave_the_hooks_on():
    class Fails(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    PointwiseRecompute(model := Fails())
    with pytest.raises(ValueError):
        model(torch.ones(1))
    w = torch.ones(3, requires_grad=True)
    y = w * w  # outside the model: autograd saves w itself again
    assert y.grad_fn._saved_self is not None


@pytest.mark.parametrize(
    "low_memory, setting, active",
    [(True, None, True), (True, False, False), (False, None, False), (False, True, True)],
)
def test_engine_default_is_on_in_low_memory_mode(low_memory, setting, active):
    model = tiny_llama()
    engine = ID3Engine(model, ID3Config(budget=50, low_memory=low_memory, recompute_pointwise=setting))
    engine.start(4)
    assert engine.recompute_active is active
    assert ("pointwise recomputation" in engine.summary()) is active
    engine.remove_hooks()
    assert not engine.recompute_active and not model._forward_pre_hooks


def test_a_loop_that_bypasses_the_models_hooks_is_warned_about():
    model = tiny_llama()
    engine = ID3Engine(model, ID3Config(budget=50, low_memory=True))
    engine.start(4)
    model.forward(**next(token_batches("lm", 1))).loss.backward()  # .forward skips the module's hooks
    with pytest.warns(UserWarning, match="saw no forward"):
        engine.step()
    assert engine._recompute.recipes == 0


def test_an_in_place_product_recomputes_from_the_values_before_it():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            h.mul_(self.b(x))  # the product overwrites one of its inputs
            return self.out(h).sum()

    x = torch.randn(3, 4)
    grads = []
    for recompute in (False, True):
        model = InPlace()
        hooks = PointwiseRecompute(model) if recompute else None
        model(x).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert hooks.recipes == 1
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_second_derivatives_through_recomputed_activations_are_unchanged():
    # create_graph=True runs backward in grad mode: the recipe's op is recorded on its inputs
    grads = []
    for recompute in (False, True):
        model = SwiGLUNet()
        hooks = PointwiseRecompute(model) if recompute else None
        loss = model(**plain_batch())["loss"]
        (g,) = torch.autograd.grad(loss, model.scale, create_graph=True)
        (g.pow(2).sum()).backward()  # a gradient penalty: differentiates the first backward
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert hooks.recipes >= 3
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-9), n
