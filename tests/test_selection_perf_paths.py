"""The selection fast paths give exactly the brute-force answer.

Brute force: score every entry with `d3_scores`, make NaN/Inf and already-unmasked entries ineligible,
concatenate everything and take the top-k with the lowest global index winning ties. The fast paths
(threshold-skipped chunks, offsets pushed in any order, small tensors scored together, embedding rows
without gradient skipped, the buffered D3 kernel, the flat SparseAdamW) must never change a single pick.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import brute_force_topk, tiny_bert, tiny_llama, token_data
from torch import nn

import id3_callback.selection as sel
from id3_callback import ID3Config, ID3Engine, SparseAdamW, d3_scores
from id3_callback.masks import UnmaskedSet
from id3_callback.selection import StreamingTopK, TensorScorer, nonzero_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def integer_scores(
    g: torch.Generator, count: int, sizes: tuple[int, int], values: int
) -> tuple[list[torch.Tensor], list[int]]:
    """`count` score tensors of random length in [sizes) holding integers in [0, values) (so many ties), and
    their global offsets (plus the total at the end)."""
    lengths = torch.randint(*sizes, (count,), generator=g)
    tensors = [torch.randint(0, values, (int(n),), generator=g).float() for n in lengths]
    return tensors, torch.tensor([0, *[t.numel() for t in tensors]]).cumsum(0).tolist()


def d3_brute(model_params, unmasked: UnmaskedSet, eps=1e-3, exp=1.0, zero_missing=False):
    out = []
    for name, p in model_params.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if p.grad is None and not zero_missing:
            out.append(torch.full((p.numel(),), float("-inf")))
            continue
        s = d3_scores(g, p.detach(), eps, exp).reshape(-1).clone()
        s = torch.nan_to_num(s, nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))
        s[unmasked.indices[name]] = float("-inf")
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------- StreamingTopK


@pytest.mark.parametrize("seed", range(8))
def test_push_at_offsets_in_any_order_equals_in_order(seed, monkeypatch):
    monkeypatch.setattr(sel, "CHUNK", 5)
    g = torch.Generator().manual_seed(seed)
    tensors, offsets = integer_scores(g, 5, (1, 30), 4)
    for t in tensors:
        t[torch.rand(t.numel(), generator=g) < 0.1] = float("-inf")
    total = offsets[-1]
    for k in (1, 3, 7, total, total + 2):
        want = brute_force_topk(tensors, k)
        top = StreamingTopK(k)
        for i in torch.randperm(len(tensors), generator=g).tolist():
            # payload = the global index itself, so we can check it travels with its entry
            idx = torch.arange(offsets[i], offsets[i + 1])
            top.push(tensors[i], offset=offsets[i], payload=idx.float())
        values, index = top.result()
        assert torch.equal(index, want), (seed, k)
        assert torch.equal(top.result_payload(), index.float())
        assert values.tolist() == torch.cat(tensors)[want].tolist()


@pytest.mark.parametrize("seed", range(4))
def test_deferred_merges_stay_exact(seed, monkeypatch):
    """Large k, many small chunks: candidates wait (filtered by a stale k-th value) and merge in batches."""
    monkeypatch.setattr(sel, "CHUNK", 64)
    g = torch.Generator().manual_seed(seed)
    tensors, offsets = integer_scores(g, 8, (100, 900), 50)
    flushes = []
    original = StreamingTopK._flush
    monkeypatch.setattr(
        StreamingTopK, "_flush", lambda self: flushes.append(len(self._pending)) or original(self)
    )
    for k in (40, 300):
        flushes.clear()
        top = StreamingTopK(k)
        for i in torch.randperm(len(tensors), generator=g).tolist():
            top.push(tensors[i], offset=offsets[i], payload=torch.arange(offsets[i], offsets[i + 1]).float())
        values, index = top.result()
        assert torch.equal(index, brute_force_topk(tensors, k)), (seed, k)
        assert torch.equal(top.result_payload(), index.float())
        assert max(flushes) > 1  # several chunks' candidates were merged at once


def test_payload_on_some_pushes_only_is_refused():
    top = StreamingTopK(2)
    top.push(torch.tensor([1.0, 2.0]), payload=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="payload"):
        top.push(torch.tensor([3.0]))
    top = StreamingTopK(2)
    top.push(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="payload"):
        top.push(torch.tensor([3.0]), payload=torch.tensor([0.3]))


def test_push_with_explicit_index_and_candidates():
    top = StreamingTopK(3)
    top.push(torch.tensor([1.0, 5.0, 1.0]), index=torch.tensor([10, 20, 30]))
    top.push_candidates(torch.tensor([5.0, float("-inf"), 1.0]), torch.tensor([15, 1, 5]))
    assert top.result()[1].tolist() == [15, 20, 5]


def test_all_ties_at_zero_pick_the_lowest_indices_fast():
    """A chunk that only ties the k-th score is skipped when it comes after it; found in O(k) otherwise."""
    top = StreamingTopK(4)
    top.push(torch.zeros(10_000), offset=50_000)
    top.push(torch.zeros(10_000), offset=0)
    top.push(torch.zeros(10_000), offset=20_000)
    assert top.result()[1].tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------- scoring


def test_d3_out_buffer_is_bitwise_the_same():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for exp in (0.0, 1.0, 2.0, 0.5):
            grad, weight = torch.randn(500, generator=g).to(dtype), torch.randn(500, generator=g).to(dtype)
            grad[::7], weight[::5] = 0, 0
            a = d3_scores(grad, weight, 1e-3, exp)
            b = d3_scores(grad, weight, 1e-3, exp, out=torch.empty(500))
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (dtype, exp)


def test_nonzero_rows_is_bitwise():
    g = torch.zeros(10, 4)
    g[2, 1] = -0.0
    g[5, 3] = float("nan")
    g[7, 0] = 1e-40  # a denormal is not zero either
    assert nonzero_rows(g).tolist() == [2, 5, 7]
    assert nonzero_rows(torch.ones(10, 4)) is None  # mostly dense: not worth gathering
    assert nonzero_rows(torch.zeros(6, 3)[:, :2]) is None  # not contiguous: no fast path
    odd = torch.zeros(4, 3)
    odd[3, 2] = 1.0
    assert nonzero_rows(odd).tolist() == [3]


def _random_case(seed: int):
    """Tensors with ties, zero rows, NaN/Inf gradients and unmasked entries."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for i, shape in enumerate([(12, 5), (7,), (30, 4), (3, 3), (16, 6)]):
        w = nn.Parameter(torch.randint(-2, 3, shape, generator=g).float() / 2)
        grad = torch.randint(-3, 4, shape, generator=g).float()
        if len(shape) == 2:  # embedding-like: most rows have no gradient at all
            grad[torch.rand(shape[0], generator=g) < 0.7] = 0.0
        if i == 4:
            grad.view(-1)[3] = float("nan")
        w.grad = grad
        params[f"t{i}"] = w
    unmasked = UnmaskedSet(params)
    for name, p in params.items():
        unmasked.add(name, torch.randperm(p.numel(), generator=g)[: p.numel() // 5])
    return params, unmasked


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("mode", ["flat", "many", "rows"])
def test_tensor_scorer_paths_equal_brute_force(seed, mode, monkeypatch):
    monkeypatch.setattr(sel, "SCORE_CHUNK", 7)  # many chunks per tensor, exclusion across chunk edges
    params, unmasked = _random_case(seed)
    offsets = torch.tensor([0, *[p.numel() for p in params.values()]]).cumsum(0).tolist()
    brute = d3_brute(params, unmasked)
    total = offsets[-1]
    for k in (1, 5, 40, total):
        want = brute_force_topk(brute, k)
        top, scorer = StreamingTopK(k), TensorScorer(partial(d3_scores, eps=1e-3, exp=1.0))
        items = list(enumerate(params.items()))
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        excluded = {n: torch.sort(unmasked.indices[n]).values for n in params}
        if mode == "many":
            scorer.push_many(
                top,
                [items[i][1][1].grad for i in order],
                [items[i][1][1] for i in order],
                [offsets[i] for i in order],
                [excluded[items[i][1][0]] for i in order],
            )
        pending = []
        for i in order:
            name, p = items[i][1]
            if mode == "flat":
                scorer.push_flat(top, p.grad, p, offsets[i], excluded[name])
            elif mode == "rows":
                rows = (
                    (p.grad.reshape(p.shape[0], -1) != 0).any(1).nonzero().view(-1) if p.dim() == 2 else None
                )
                if rows is None:
                    scorer.push_flat(top, p.grad, p, offsets[i], excluded[name])
                else:
                    scorer.push_rows(top, p.grad, p, offsets[i], rows, excluded[name])
                    pending.append((p, offsets[i], rows, excluded[name]))
        if not top.full or top.threshold() <= 0:
            for p, offset, rows, ex in pending:
                scorer.push_zero_rows(top, p, offset, rows, ex)
        assert torch.equal(top.result()[1], want), (seed, mode, k)
        assert not scorer.finite  # t4 holds a NaN gradient


@pytest.mark.parametrize("exp", [0.0, 1.0, 2.0])
def test_gradient_bound_never_drops_a_tie_with_the_kth_score(exp):
    """A zero weight scores exactly |g| / eps^exp, the bound itself: such a chunk must still be scored."""
    eps = 1e-3
    score = partial(d3_scores, eps=eps, exp=exp)
    top, scorer = StreamingTopK(2), TensorScorer(score)
    ones, zeros = torch.ones(2), torch.zeros(2)
    scorer.push_flat(top, ones, zeros, offset=10, excluded=torch.empty(0, dtype=torch.long))
    assert top.full
    g = torch.tensor([0.0, 1.0, 0.0])  # ties the k-th score, at a lower global index
    scorer.push_flat(top, g, torch.zeros(3), offset=0, excluded=torch.empty(0, dtype=torch.long))
    assert top.result()[1].tolist() == [1, 10]


def test_gradient_bound_skips_chunks_and_stays_exact(monkeypatch):
    monkeypatch.setattr(sel, "SCORE_CHUNK", 50)
    calls = []
    monkeypatch.setattr(sel, "d3_scores", lambda *a, **kw: calls.append(1) or d3_scores(*a, **kw))
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(2000, generator=g) * 1e-6  # tiny gradients: |g| / eps far below the winners
    grad[[3, 10, 1999]] = torch.tensor([0.5, -0.7, 0.6])  # two winners in the first chunk set the bar
    weight = torch.randn(2000, generator=g) * 0.05
    top, scorer = StreamingTopK(2), TensorScorer(partial(d3_scores, eps=1e-3, exp=1.0))
    scorer.push_flat(top, grad, weight, offset=0, excluded=torch.empty(0, dtype=torch.long))
    want = brute_force_topk([d3_scores(grad, weight)], 2)
    assert torch.equal(top.result()[1], want)
    assert len(calls) < 2000 // 50 // 2  # most chunks were settled by the gradient bound alone


@pytest.mark.parametrize("seed", range(6))
def test_at_least_equals_compare_and_nonzero(seed, monkeypatch):
    monkeypatch.setattr(sel, "BLOCK", 4)
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 200, (1,), generator=g))
    values = torch.randint(-6, 7, (n,), generator=g).float()
    values[torch.rand(n, generator=g) < 0.2] = float("-inf")
    used = 0
    for cut in (3.0, 5.0, 6.0, 7.0):
        for negative in (False, True):
            want = (values <= -cut if negative else values >= cut).nonzero().view(-1)
            monkeypatch.setattr(sel, "FEW", 1.0)  # never give up: check the answer itself
            assert torch.equal(sel.at_least(values, cut, negative), want), (cut, negative)
            monkeypatch.setattr(sel, "FEW", 0.25)
            found = sel.at_least(values, cut, negative)
            used += found is not None
            assert found is None or torch.equal(found, want)
    assert used or n < 16  # the block search answered at least once where it could


@pytest.mark.parametrize("seed", range(6))
def test_streaming_topk_block_search_keeps_ties_exact(seed, monkeypatch):
    """Big chunks after the top is full go through `at_least`; many ties sit at the k-th value."""
    monkeypatch.setattr(sel, "BLOCK", 4)
    monkeypatch.setattr(sel, "CHUNK", 64)
    g = torch.Generator().manual_seed(seed)
    tensors, offsets = integer_scores(g, 6, (20, 300), 30)
    for k in (1, 4, 17, 60):
        top = StreamingTopK(k)
        for i in torch.randperm(len(tensors), generator=g).tolist():
            top.push(tensors[i], offset=offsets[i])
        assert torch.equal(top.result()[1], brute_force_topk(tensors, k)), (seed, k)


@pytest.mark.parametrize("exp", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("sides", ["both", "positive", "negative"])
@pytest.mark.parametrize("seed", range(3))
def test_gradient_prefilter_scores_only_candidates_and_stays_exact(exp, sides, seed, monkeypatch):
    """Chunks the bound cannot settle: only entries whose own bound reaches the k-th score are scored.

    Winners sit on zero weights (their score is exactly the bound, so they tie it), some candidates are
    already unmasked, the largest gradient sits on a NaN weight, and the fp16 loss scale is on: the picks must equal brute force.
    """
    monkeypatch.setattr(sel, "SCORE_CHUNK", 400)
    monkeypatch.setattr(sel, "BLOCK", 8)
    few = []
    original = TensorScorer._push_few
    monkeypatch.setattr(
        TensorScorer, "_push_few", lambda self, *a: few.append(a[3].numel()) or original(self, *a)
    )
    g = torch.Generator().manual_seed(seed)
    n, scale = 4000, 8.0
    magnitude = torch.rand(n, generator=g) * 1e-4
    hot = torch.randperm(n, generator=g)[:60]
    magnitude[hot] = torch.rand(60, generator=g) + 0.5
    magnitude[hot[20:24]] = magnitude[hot[0]].item()  # exact ties with a winner, on nonzero and zero weights
    weight = torch.randn(n, generator=g) * 0.05
    weight[hot[:22]] = 0.0  # these score exactly |g| / eps^exp: ties with the bound itself
    sign = {"both": torch.randn(n, generator=g).sign(), "positive": 1.0, "negative": -1.0}[sides]
    grad = magnitude * sign
    weight[magnitude.argmax()] = float("nan")  # the largest |g| is always a candidate
    excluded = torch.sort(hot[::7]).values
    score = partial(d3_scores, eps=1e-3, exp=exp)
    scaled = grad * scale
    brute = d3_scores(grad, weight, 1e-3, exp).clone()
    brute[excluded] = float("-inf")
    for k in (1, 5, 25):
        top, scorer = StreamingTopK(k), TensorScorer(score, grad_scale=scale, keep_grads=True)
        scorer.push_flat(top, scaled, weight, offset=3, excluded=excluded)
        want = brute_force_topk([torch.zeros(3), brute], k)
        values, index = top.result()
        assert torch.equal(index, want), (k, index, want)
        assert torch.equal(top.result_payload(), scaled[index - 3])  # candidates carry their own gradient
        assert scorer.finite == (exp == 0)  # the NaN weight was scored (with exp=0 it plays no part)
    assert few and max(few) <= sel.FEW * 400  # the prefilter ran, on a few blocks each time


# ----------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("model_fn, kind", [(tiny_bert, "cls"), (tiny_llama, "lm")])
@pytest.mark.parametrize("variant", ["default", "row_sparse", "per_tensor"])
@pytest.mark.parametrize("batched", ["never", "always"])  # streaming, and batched_topk (CUDA's default)
def test_engine_push_scores_equals_brute_force(model_fn, kind, variant, batched, monkeypatch):
    monkeypatch.setattr(sel, "BATCHED_SELECTION", batched)
    if variant == "row_sparse":  # the tiny embeddings take the row path
        monkeypatch.setattr(sel, "ROW_SPARSE_MIN_ENTRIES", 1)
        monkeypatch.setattr(sel, "SMALL_TENSOR", 0)
        monkeypatch.setattr(sel, "SCORE_CHUNK", 64)
    if variant == "per_tensor":  # no small-tensor batching, many chunks
        monkeypatch.setattr(sel, "SMALL_TENSOR", 0)
        monkeypatch.setattr(sel, "SCORE_CHUNK", 100)
    model = model_fn()
    engine = ID3Engine(model, ID3Config(budget=500))
    engine.start(5)
    data = token_data(n=8, seq=12, kind=kind)
    batch = {key: torch.stack([data[i][key] for i in range(8)]) for key in data.columns}
    engine.add_global(torch.randperm(engine.selectable, generator=torch.Generator().manual_seed(1))[:300])
    model(**batch).loss.backward()
    brute = d3_brute(engine.unmasked.params, engine.unmasked)
    for k in (1, 17, 250):
        top = StreamingTopK(k)
        assert engine.scan.push_scores(top, partial(d3_scores, eps=1e-3, exp=1.0))
        assert torch.equal(top.result()[1], brute_force_topk(brute, k)), (variant, k)


@pytest.mark.parametrize("batched", ["never", "always"])
def test_row_sparse_fallback_when_fewer_positive_scores_than_k(batched, monkeypatch):
    """Zero-gradient rows score 0 and are eligible: when k exceeds the positive scores they are picked,
    lowest index first, exactly as the dense path would."""
    monkeypatch.setattr(sel, "BATCHED_SELECTION", batched)
    monkeypatch.setattr(sel, "ROW_SPARSE_MIN_ENTRIES", 1)
    emb = nn.Embedding(50, 4)
    model = nn.Sequential(emb)
    engine = ID3Engine(model, ID3Config(budget=100))
    engine.start(1)
    emb(torch.tensor([3, 7])).sum().backward()  # rows 3 and 7: 8 positive scores
    assert "0.weight" in engine.scan.row_sparse
    brute = d3_brute(engine.unmasked.params, engine.unmasked)
    top = StreamingTopK(20)
    engine.scan.push_scores(top, partial(d3_scores, eps=1e-3, exp=1.0))
    want = brute_force_topk(brute, 20)
    assert torch.equal(top.result()[1], want)
    assert sorted(want[8:].tolist()) == list(range(12))  # the zeros: lowest indices


def test_low_memory_row_path_keeps_no_reference_to_freed_gradients(monkeypatch):
    """Inside backward the embedding takes the row path too, but its gradient is freed there: the engine
    must not keep it alive for masking (there is nothing to mask in low-memory mode)."""
    monkeypatch.setattr(sel, "ROW_SPARSE_MIN_ENTRIES", 1)
    monkeypatch.setattr(sel, "SMALL_TENSOR", 0)  # the tiny embedding is not batched with the biases
    data = token_data(n=2, seq=6, kind="cls")
    batch = {key: torch.stack([data[i][key] for i in range(2)]) for key in data.columns}
    model = tiny_bert()
    # A dense embedding gradient (the low-memory mode would make it row-sparse by default): the row scan
    engine = ID3Engine(model, ID3Config(budget=400, low_memory=True, sparse_embedding_grads=False))
    engine.start(4)
    rows_seen = []
    push_rows = TensorScorer.push_rows
    monkeypatch.setattr(
        TensorScorer, "push_rows", lambda self, *a: rows_seen.append(1) or push_rows(self, *a)
    )
    model(**batch).loss.backward()
    assert rows_seen, "the embedding took the row path inside backward"
    assert not engine.scan.nonzero_rows
    engine.step()


@pytest.mark.parametrize("model_fn, kind", [(tiny_bert, "cls"), (tiny_llama, "lm")])
def test_row_sparse_masking_equals_dense_masking(model_fn, kind, monkeypatch):
    """Masking zeroes only the rows scoring found nonzero; every gradient bit equals zeroing everything."""
    monkeypatch.setattr(sel, "ROW_SPARSE_MIN_ENTRIES", 1)
    monkeypatch.setattr(sel, "SMALL_TENSOR", 0)  # the tiny embedding is not batched with the biases
    data = token_data(n=2, seq=6, kind=kind)  # few tokens: most embedding rows get no gradient
    batch = {key: torch.stack([data[i][key] for i in range(2)]) for key in data.columns}
    grads = []
    for use_rows in (True, False):
        torch.manual_seed(0)
        model = model_fn()
        engine = ID3Engine(model, ID3Config(budget=400))
        engine.start(4)
        given = []
        mask = partial(UnmaskedSet.mask_gradients, engine.unmasked)
        # with use_rows=False the rows are ignored: every gradient is zeroed in full
        monkeypatch.setattr(
            engine.unmasked,
            "mask_gradients",
            lambda rows, given=given, mask=mask, use_rows=use_rows: (
                given.append(rows) or mask(rows if use_rows else None)
            ),
        )
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            engine.step()
        assert all(given), "the embedding took the row path"
        assert not engine.scan.nonzero_rows  # released after masking: no gradient outlives its step
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name].view(torch.int32), grads[1][name].view(torch.int32)), name


# ------------------------------------------------------------------------------------------ SparseAdamW


def reference_sparse_adamw_step(params, unmasked, state, lr, betas, eps, wd):
    """The per-tensor SparseAdamW update, written out entry by entry as a reference."""
    beta1, beta2 = betas
    for p in params:
        idx = unmasked.indices_for(p)
        if p.grad is None or (idx is not None and idx.numel() == 0):
            continue
        flat = p.detach().view(-1)
        idx = torch.arange(p.numel()) if idx is None else idx
        grad, weight = p.grad.view(-1)[idx], flat[idx]
        s = state.setdefault(id(p), {"m": torch.zeros(0), "v": torch.zeros(0), "t": torch.zeros(0)})
        grow = idx.numel() - s["m"].numel()
        for key in s:
            s[key] = torch.cat([s[key], torch.zeros(grow)])
        s["t"].add_(1)
        if wd:
            weight.mul_(1 - lr * wd)
        s["m"].lerp_(grad, 1 - beta1)
        s["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        steps = s["t"].long()
        bias1 = torch.tensor([1 - torch.pow(beta1, torch.arange(n + 1.0))[n].item() for n in steps.tolist()])
        bias2_sqrt = torch.tensor(
            [(1 - torch.pow(beta2, torch.arange(n + 1.0))[n]).sqrt().item() for n in steps.tolist()]
        )
        denom = (s["v"].sqrt() / bias2_sqrt).add_(eps)
        weight.sub_((s["m"] / denom).mul_(lr / bias1))
        flat[idx] = weight


def test_flat_sparse_adamw_is_bitwise_the_per_tensor_update():
    torch.manual_seed(0)
    a = nn.ModuleList([nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(3, 2)])
    b = nn.ModuleList([nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(3, 2)])
    b.load_state_dict(a.state_dict())
    config = ID3Config(budget=40, dense=r"^2\.")  # the last layer trains densely
    ea, eb = ID3Engine(a, config), ID3Engine(b, config)
    decay = [p for n, p in a.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in a.named_parameters() if not n.endswith("weight")]
    opt = SparseAdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        ea.unmasked,
        lr=0.05,
        betas=(0.8, 0.95),
        eps=1e-6,
    )
    state: dict = {}
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        new = torch.randperm(ea.selectable, generator=g)[:5]
        new = new[
            ~torch.isin(new, torch.cat([ea.plan.offsets[n] + i for n, i in ea.unmasked.indices.items()]))
        ]
        ea.add_global(new)
        eb.add_global(new)
        for pa, pb in zip(a.parameters(), b.parameters()):
            grad = torch.randn(pa.shape, generator=g)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        ea.unmasked.mask_gradients()
        eb.unmasked.mask_gradients()
        opt.step()
        named_b = dict(b.named_parameters())
        for group_params, wd in ((decay, 0.1), (rest, 0.0)):
            names = [n for n, p in a.named_parameters() if any(p is q for q in group_params)]
            reference_sparse_adamw_step(
                [named_b[n] for n in names], eb.unmasked, state, 0.05, (0.8, 0.95), 1e-6, wd
            )
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa.detach(), pb.detach()), (step, name)
