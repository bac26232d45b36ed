"""Device->host synchronisations of one `engine.step` are O(1): they do not grow with tensors or chunks.

On CPU nothing stalls, so the reads are counted: every op whose result the host must wait for
(`aten._local_scalar_dense`: `.item()`, `bool()`, `int()`; `nonzero`, `masked_select`, boolean indexing,
`unique`, `repeat_interleave` without `output_size`: data-dependent shapes), plus `.tolist()`, `.cpu()`,
`.numpy()` at the Python level (`tolist` reaches no aten op). On CUDA (`pytest --device cuda`) the same test
also runs the step under `torch.cuda.set_sync_debug_mode("warn")` and counts its warnings.

The batched selection (`batched_topk.top_d3`) is also checked against the brute-force top-k here, on the
shapes that reach each of its rounds (seed, hot blocks, segments scored whole, tails, ties, NaN, loss scale).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial

import pytest
import torch
from helpers import brute_force_topk
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from id3_callback import ID3Config, ID3Engine
from id3_callback import selection as sel
from id3_callback.batched_topk import Segment, concatenated, top_d3
from id3_callback.scores import d3_scores

aten = torch.ops.aten
# Ops whose output shape or value the host needs before it can go on.
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.repeat_interleave.Tensor,
}
SYNC_METHODS = {torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}


class _CountDispatch(TorchDispatchMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sync = func in SYNC_OPS
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None:
            sync = False
        if func is aten.index.Tensor:  # boolean masks need a nonzero inside
            sync = any(i is not None and i.dtype == torch.bool for i in args[1])
        if sync:
            self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **kwargs)


class _CountFunction(TorchFunctionMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNC_METHODS:
            self.counts[func.__name__] = self.counts.get(func.__name__, 0) + 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_syncs():
    """Counts, by kind, the device->host reads of the code inside (see the module docstring)."""
    counts: dict[str, int] = {}
    with _CountFunction(counts), _CountDispatch(counts):
        yield counts


def _stack(n_layers: int, width: int, device) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(n_layers):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 3)).to(device)


def _llama(layers: int) -> nn.Module:
    """A Llama whose embedding (4096 x 32) is large enough for the row-sparse scoring path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _syncs_of_step(model: nn.Module, device, budget: int = 4000, steps: int = 3) -> list[int]:
    """Host reads of each of `steps` engine.step calls (the set grows, so exclusions are in play)."""
    engine = ID3Engine(model, ID3Config(budget=budget))
    engine.start(steps)
    x = torch.randn(16, model[0].in_features, device=device)
    out = []
    for _ in range(steps):
        model.zero_grad()
        model(x).pow(2).sum().backward()
        with count_host_syncs() as counts:
            engine.step()
        out.append(sum(counts.values()))
    return out


@pytest.fixture
def batched(monkeypatch):
    """The batched selection on every device (on CPU "auto" streams; see `selection.BATCHED_SELECTION`)."""
    monkeypatch.setattr(sel, "BATCHED_SELECTION", "always")


def test_step_syncs_do_not_grow_with_tensors_or_chunks(device, batched, monkeypatch):
    """2 vs 24 linear layers, each its own segment, and chunks of 1M vs 256 entries: the same count."""
    monkeypatch.setattr(sel, "SMALL_TENSOR", 0)  # no batching of small tensors: one segment per tensor
    few = _syncs_of_step(_stack(2, 96, device), device)
    many = _syncs_of_step(_stack(24, 96, device), device)
    monkeypatch.setattr(sel, "SCORE_CHUNK", 256)
    monkeypatch.setattr(sel, "CHUNK", 256)
    chunked = _syncs_of_step(_stack(24, 96, device), device)
    assert max(few) <= 8, few  # three rounds of the selection, the split of the winners, their scores
    assert few == many == chunked, (few, many, chunked)


def test_step_syncs_with_embeddings_are_a_constant_per_table(device, batched):
    """A language model: the embedding's zero-row check adds a few reads per table, not per layer."""
    counts = []
    for layers in (1, 4):
        model = _llama(layers).to(device)
        engine = ID3Engine(model, ID3Config(budget=3000))
        engine.start(2)
        assert engine.scan.row_sparse  # the embedding takes the zero-row path
        ids = torch.randint(0, 4096, (2, 12), device=device)
        model(input_ids=ids, labels=ids).loss.backward()
        with count_host_syncs() as c:
            engine.step()
        counts.append(sum(c.values()))
    assert counts[0] == counts[1] and counts[0] <= 25, counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.set_sync_debug_mode needs CUDA")
def test_cuda_sync_debug_mode_sees_a_constant_number(device, batched):
    if device.type != "cuda":
        pytest.skip("run with --device cuda")
    seen = []
    for layers in (2, 24):
        model = _stack(layers, 96, device)
        engine = ID3Engine(model, ID3Config(budget=4000))
        engine.start(2)
        model(torch.randn(16, 96, device=device)).pow(2).sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        seen.append(len(caught))
    assert seen[0] == seen[1], seen


def test_streaming_steps_read_per_chunk(device, monkeypatch):
    """What the batched selection removes: streaming chunk by chunk, the reads grow with the chunks."""
    monkeypatch.setattr(sel, "BATCHED_SELECTION", "never")
    monkeypatch.setattr(sel, "SMALL_TENSOR", 0)
    few = _syncs_of_step(_stack(2, 96, device), device)
    many = _syncs_of_step(_stack(24, 96, device), device)
    assert min(many) > max(few), (few, many)


def test_batched_selection_setting_is_checked(monkeypatch):
    engine = ID3Engine(_stack(1, 8, "cpu"), ID3Config(budget=10))
    monkeypatch.setattr(sel, "BATCHED_SELECTION", "sometimes")
    with pytest.raises(ValueError, match="BATCHED_SELECTION"):
        engine.scan.batched()


# ------------------------------------------------------------------------------------- top_d3 is exact
def _brute(grads, weights, excluded, eps, exp, scale):
    parts = []
    for g, w, ex in zip(grads, weights, excluded):
        s = d3_scores(g, w, eps, exp).clone()
        if scale != 1:  # the engine scores the scaled gradient, then multiplies by 1/scale
            s.mul_(1 / scale)
        s[ex] = float("-inf")
        parts.append(s)
    return parts


CASES = {
    "random": dict(sizes=[5000, 128 * 40, 333, 70_000], k=50),
    "large_k": dict(sizes=[5000, 6000], k=4000),
    "ties_at_zero": dict(sizes=[4096, 4096], k=300, zero_fraction=0.97),
    "integer_ties": dict(sizes=[3000, 2048, 900], k=120, integers=True),
    "nan_and_inf": dict(sizes=[4096, 5000], k=40, nonfinite=True),
    "loss_scale": dict(sizes=[4096, 4096], k=64, scale=1024.0),
    "hot_everywhere": dict(sizes=[512 * 16, 512 * 16], k=900, spread=True),
    "tiny_blocks": dict(sizes=[1000, 513, 77], k=30, block=16),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("exp", [1.0, 0.5])
def test_top_d3_equals_brute_force(case, exp, device, monkeypatch):
    spec = CASES[case]
    if "block" in spec:
        monkeypatch.setattr(sel, "BOUND_BLOCK", spec["block"])
    monkeypatch.setattr(sel, "SCORE_CHUNK", 2048)  # several chunks when a segment is scored whole
    gen = torch.Generator().manual_seed(len(case))
    grads, weights, excluded = [], [], []
    for n in spec["sizes"]:
        g = torch.randn(n, generator=gen) * torch.rand(n, generator=gen).pow(6)
        if spec.get("spread"):
            g = torch.randn(n, generator=gen)
        if spec.get("integers"):
            g = torch.randint(-3, 4, (n,), generator=gen).float()
        if "zero_fraction" in spec:
            g[torch.rand(n, generator=gen) < spec["zero_fraction"]] = 0.0
        w = torch.randn(n, generator=gen)
        if spec.get("integers"):
            w = torch.ones(n)
        if spec.get("nonfinite"):
            g[n // 3] = float("nan")
            g[n // 2] = float("inf")
        grads.append(g.to(device))
        weights.append(w.to(device))
        excluded.append(torch.sort(torch.randperm(n, generator=gen)[: n // 20]).values.to(device))
    scale = spec.get("scale", 1.0)
    offsets = [0]
    for n in spec["sizes"][:-1]:
        offsets.append(offsets[-1] + n)
    segments = [Segment(g, w, o, ex) for g, w, o, ex in zip(grads, weights, offsets, excluded)]
    brute = _brute(grads, weights, excluded, 1e-3, exp, scale)
    k = spec["k"]
    values, index, finite, kth = top_d3(segments, k, 1e-3, exp, scale)
    want = brute_force_topk([b.cpu() for b in brute], k)
    assert torch.equal(index.cpu(), want), case
    flat = torch.cat([b.cpu() for b in brute])
    assert torch.equal(values.cpu(), flat[want])
    assert finite == (not spec.get("nonfinite"))
    assert (kth is not None) == (want.numel() == k)
    # The same entries as one concatenated segment (the small-tensor path), offered in another order.
    order = list(reversed(range(len(grads))))
    merged = concatenated(
        [grads[i] for i in order],
        [weights[i] for i in order],
        [offsets[i] for i in order],
        [excluded[i] for i in order],
    )
    assert torch.equal(top_d3([merged], k, 1e-3, exp, scale)[1].cpu(), want)


def test_top_d3_bf16_gradients_equal_brute_force(device):
    gen = torch.Generator().manual_seed(3)
    g = (torch.randn(10_000, generator=gen) * torch.rand(10_000, generator=gen).pow(4)).bfloat16().to(device)
    w = torch.randn(10_000, generator=gen).bfloat16().to(device)
    values, index, _, _ = top_d3([Segment(g, w)], 77, 1e-3, 1.0)
    want = brute_force_topk([d3_scores(g, w, 1e-3, 1.0).cpu()], 77)
    assert torch.equal(index.cpu(), want)


def test_engine_step_matches_the_streaming_path(device, batched):
    """The batched selection and the chunk-by-chunk one (`TensorScorer`) choose the same entries."""
    from id3_callback.selection import StreamingTopK, TensorScorer

    model = _stack(6, 64, device)
    engine = ID3Engine(model, ID3Config(budget=2000))
    engine.start(4)
    model(torch.randn(8, 64, device=device)).pow(2).sum().backward()
    score = partial(d3_scores, eps=1e-3, exp=1.0)
    engine.add_global(torch.arange(0, engine.selectable, 7, device=device)[:500])
    streaming, scorer = StreamingTopK(600), TensorScorer(score)
    for name, p in engine.unmasked.params.items():
        scorer.push_flat(streaming, p.grad, p, engine.scan.offsets[name], engine.scan.sorted_unmasked(name))
    assert engine.scan.batched()
    values, index = engine.scan.top_by_gradient(600, score)
    assert torch.equal(index, streaming.result()[1])
    assert torch.equal(values, streaming.result()[0])
