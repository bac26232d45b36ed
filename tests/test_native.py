"""The native kernels of the bounded path (id3_callback/native.py) against its torch code, and the fallback
when there is no compiler. The live-token scan and the scoring of GEMM rows give the torch code's results
bitwise (kept tokens, top-k, scores, gradients, verified counts). The bound branch's dot products and group
norms sum in another order than sampled_addmm and the group GEMM, so there the two agree up to rounding
(the same selection unless two scores tie within it; bitwise where every sum is exact).

Each case runs twice, `ID3_NATIVE=0` (torch) and `1` (native), on the same inputs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import same_up_to_rounding, tiny_bert, token_batches

from id3_callback import ID3Config, ID3Engine, SparseAdamW, bounded_costs, d3_scores, native, selection
from id3_callback import bounded as bounded_mod
from id3_callback.bounded import bounded_weight_grad, live_tokens, push_block
from id3_callback.selection import StreamingTopK, TensorScorer

pytestmark = pytest.mark.usefixtures("one_thread")
needs_native = pytest.mark.skipif(
    native.library() is None,
    reason="native kernels unavailable (no compiler, or ID3_NATIVE=0): the torch code runs",
)


def both(monkeypatch, fn, calls=None):
    """fn() with the torch code, then with the native kernels; `calls` (a dict) counts the kernel calls."""
    out = []
    for flag in ("0", "1"):
        monkeypatch.setenv("ID3_NATIVE", flag)
        out.append(fn())
        if flag == "0" and calls is not None:
            for name in (
                "live_rows",
                "score_block",
                "bound_hits",
                "gathered_dots",
                "pair_dots",
                "group_square_sums",
            ):
                monkeypatch.setattr(native, name, _counted(calls, name, getattr(native, name)))
    return out


def _counted(calls, name, fn):
    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return fn(*args, **kwargs)

    return counted


def _equal(x, y) -> bool:
    """Bitwise equality (NaNs included) of tensors, or of tuples / lists / dicts of them."""
    if isinstance(x, torch.Tensor):
        same = x.dtype == y.dtype and x.shape == y.shape
        return same and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_equal(a, b) for a, b in zip(x, y))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_equal(x[n], y[n]) for n in x)
    return x == y


def _grads(seed, tokens, dead, rows, cols):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(tokens, rows, generator=gen)
    g[torch.randperm(tokens, generator=gen)[:dead]] = 0.0
    return g, torch.randn(tokens, cols, generator=gen)


@needs_native
@pytest.mark.parametrize(
    "case",
    [
        "many_dead",
        "few_dead",
        "all_dead",
        "negative_zero",
        "nan_grad",
        "inf_input",
        "nan_input",
        "strided",
        "column_major",
        "one",
    ],
)
def test_live_tokens_native_equals_torch(case, monkeypatch):
    g, h = _grads(0, 64, 40, 70, 90)
    if case == "few_dead":
        g, h = _grads(1, 64, 3, 70, 90)  # below DEAD_FRACTION: keep every token
    elif case == "all_dead":
        g.zero_()
    elif case == "negative_zero":
        g[g[:, 5] == 0, 7] = -0.0  # -0.0 adds nothing either: dead
        g[g[:, 5] == 0, 0] = 1e-45  # a denormal is not zero: live
    elif case == "nan_grad":
        g[g[:, 0] == 0, 69] = float("nan")  # every dead row turns live
    elif case == "inf_input":
        h[(g[:, 0] == 0).nonzero()[:4].view(-1), 3] = float("inf")  # 0 * inf = NaN: kept
    elif case == "nan_input":
        h[(g[:, 0] == 0).nonzero()[-1], 89] = float("nan")
    elif case == "strided":
        g, h = g[:, 3:60], torch.randn(64, 200)[:, 10:100]  # rows apart: read in place
    elif case == "column_major":
        h = h.t().contiguous().t()  # not rows: the torch code
    elif case == "one":
        g, h = g[:1] * 0, h[:1]
    calls = {}
    torch_keep, native_keep = both(monkeypatch, lambda: live_tokens(g, h), calls)
    assert calls == ({} if case == "column_major" else {"live_rows": 1})
    assert _equal(torch_keep, native_keep) if torch_keep is not None else native_keep is None


def _layer(seed, tokens=48, rows=40, cols=36, unmasked=50, weights="plain"):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(tokens, rows, generator=gen) * torch.rand(1, rows, generator=gen) * 3
    b = torch.randn(tokens, cols, generator=gen)
    w = torch.randn(rows, cols, generator=gen) * 0.1
    if weights == "special":
        w.view(-1)[torch.randperm(w.numel(), generator=gen)[:30]] = float("nan")
        w.view(-1)[torch.randperm(w.numel(), generator=gen)[:30]] = float("inf")
        w.view(-1)[torch.randperm(w.numel(), generator=gen)[:30]] = 0.0
    elif weights == "ties":
        a, b, w = a.sign(), b.sign(), torch.full((rows, cols), 0.5)  # many equal gradients and scores
    idx = torch.randperm(rows * cols, generator=gen)[:unmasked]
    return a, b, w, idx


def _run(a, b, w, idx, tau, k, exp, previous=None):
    top = StreamingTopK(k)
    scorer = TensorScorer(d3_scores, keep_grads=True)
    scorer.d3 = (1e-3, exp)
    scorer.bound_factor = (1 + 1e-5) / (torch.tensor(1e-3).item() ** exp if exp else 1.0)
    ex = torch.sort(idx).values
    n, kept = bounded_weight_grad(a, b, w, idx, ex, tau, top, scorer, offset=7)
    if previous is not None:  # score again with a lower tau, as `certify` does
        n2, _ = bounded_weight_grad(a, b, w, ex[:0], ex, previous, top, scorer, 7, previous_tau=tau)
        n += n2
    values, index = top.result()
    return values, index, top.result_payload(), n, kept, scorer.finite


@needs_native
@pytest.mark.parametrize("exp", [1.0, 0.0, 2.0])  # 2.0: not native, the torch code on both sides
@pytest.mark.parametrize("weights", ["plain", "special", "ties"])
@pytest.mark.parametrize("path", ["gemm_rows", "bound", "bound_dense_blocks", "rescored"])
@pytest.mark.parametrize("k", [1, 30, 5000])  # 5000: more than the layer, never full
def test_bounded_kernel_native_equals_torch(exp, weights, path, k, monkeypatch):
    monkeypatch.setattr(bounded_mod, "BLOCK_ENTRIES", 36 * 6)  # row blocks of 6 rows
    monkeypatch.setattr(bounded_mod, "NATIVE_CAP", 8)  # the cap is hit too: the torch code takes that block
    monkeypatch.setattr(selection, "SCORE_CHUNK", 36 * 5)  # several GEMM row blocks per layer
    monkeypatch.setattr(bounded_mod, "DENSE_FRACTION", 0.3 if path == "bound_dense_blocks" else 2.0)
    a, b, w, idx = _layer(3, weights=weights)
    reference = _run(a, b, w, idx, 0.0, max(k, 1), exp)
    tau = reference[0][min(k, reference[0].numel()) - 1].item() * (0.7 if path != "rescored" else 1.3)
    if path == "gemm_rows":
        tau = 0.0
    previous = tau * 0.5 if path == "rescored" else None
    calls = {}
    torch_run, native_run = both(monkeypatch, lambda: _run(a, b, w, idx, tau, k, exp, previous), calls)
    if exp != 2.0 and k < 5000:  # the kernels ran (the torch code is the reference, not itself)
        assert calls.get("score_block" if path == "gemm_rows" else "bound_hits", 0) > 0
    if path == "gemm_rows":
        assert _equal(torch_run, native_run) and _equal(torch_run, reference)
        return
    if k < 5000:  # (k = 5000: tau is 0, every entry from GEMM rows)
        assert calls.get("gathered_dots", 0) + calls.get("pair_dots", 0) > 0
        assert calls.get("group_square_sums", 0) > 0
    if weights == "ties":  # ±1 products: every sum exact in any order, so bitwise here too
        assert _equal(torch_run, native_run)
        return
    (tv, ti, tp, tn, tk, tf), (nv, ni, np_, nn, nk, nf) = torch_run, native_run
    scores = reference_scores(a, b, w, idx, exp)
    cut = tv[-1].item() if tv.numel() else 0.0
    assert same_up_to_rounding(set(ti.tolist()), set(ni.tolist()), scores, cut)
    # Gradients within the rounding of any order of summing T products; scores are d3 of those gradients.
    magnitude = (a.abs().t() @ b.abs()).view(-1)
    err = 2 * (bounded_mod.slack(a.shape[0]) - 1)
    if torch.equal(ti, ni):
        assert bool(((np_ - tp).abs() <= err * magnitude[ti - 7]).all())
    assert _equal(nv, d3_scores(np_, w.reshape(-1)[ni - 7], 1e-3, exp))
    assert bool(((nk - tk).abs() <= err * magnitude[idx]).all())
    assert tf == nf
    assert abs(tn - nn) <= max(2, tn // 100)  # candidate sets may differ only within rounding of the level


def reference_scores(a, b, w, idx, exp):
    """Every entry's D3 score from a float64 product (the unmasked ones -inf)."""
    grads = (a.double().t() @ b.double()).float().view(-1)
    scores = d3_scores(grads, w.reshape(-1), 1e-3, exp)
    scores[idx] = float("-inf")
    return scores


@needs_native
@pytest.mark.parametrize("tokens", [1, 31, 32, 100, 512])  # below, at and above the 32 running sums
def test_gathered_dots_are_the_products(tokens):
    gen = torch.Generator().manual_seed(tokens)
    a, b = torch.randn(tokens, 30, generator=gen), torch.randn(tokens, 20, generator=gen)
    flat = torch.randperm(600, generator=gen)[:150]  # any order
    rows, cols = flat // 20, flat % 20
    got = native.gathered_dots(a.t().contiguous(), b.t().contiguous(), rows, cols)
    exact = (a.double().t() @ b.double()).view(-1)[flat]
    magnitude = (a.double().abs().t() @ b.double().abs()).view(-1)[flat]
    assert bool(((got.double() - exact).abs() <= (bounded_mod.slack(tokens) - 1) * magnitude).all())
    some = torch.tensor([0, 7, 149])  # each value depends only on its own pair
    assert _equal(
        native.gathered_dots(a.t().contiguous(), b.t().contiguous(), rows[some], cols[some]), got[some]
    )
    if tokens > 1:  # a strided view would be read wrongly (at T = 1 the view is contiguous)
        with pytest.raises(ValueError, match="contiguous transposes"):
            native.gathered_dots(a.t(), b.t().contiguous(), rows, cols)


@needs_native
@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 100, 512])  # below, at and above a tile of 16 tokens
def test_gather_columns_is_index_select_transposed(tokens):
    """The tiled copy is `index_select(1, idx).t().contiguous()` exactly, strided rows and NaN/-0 included."""
    gen = torch.Generator().manual_seed(tokens)
    wide = torch.randn(tokens, 50, generator=gen)
    wide[0, 3], wide[-1, 4], wide[tokens // 2, 5] = float("nan"), -0.0, float("-inf")
    a = wide[:, :37]  # rows contiguous, row stride 50
    for idx in (
        torch.tensor([3, 4, 5, 36]),
        torch.randperm(37, generator=gen),
        torch.tensor([], dtype=torch.long),
    ):
        got = native.gather_columns(a, idx)
        assert got.is_contiguous() and got.shape == (idx.numel(), tokens)
        assert _equal(got, a.index_select(1, idx).t().contiguous())


@needs_native
@pytest.mark.parametrize("tokens", [1, 5, 31, 32, 33, 100, 512])  # whole and partial blocks of 32 sums
def test_pair_dots_are_gathered_dots_bitwise(tokens):
    """The two native kernels keep the same 32 sums in the same order: either may serve any call."""
    gen = torch.Generator().manual_seed(tokens)
    a, b = torch.randn(tokens, 40, generator=gen), torch.randn(tokens, 30, generator=gen)
    a[0, :5], b[0, :5] = -0.0, 0.0  # signed zeros: the +0 added for a missing token keeps them alike
    a[:, 7], b[:, 8] = 0.0, -0.0
    flat = torch.randperm(1200, generator=gen)[:900]  # more than one chunk of 256, any order
    rows, cols = flat // 30, flat % 30
    order = torch.argsort(rows, stable=True)
    in_place = native.pair_dots(a, b, rows, cols)
    copied = native.gathered_dots(a.t().contiguous(), b.t().contiguous(), rows[order], cols[order])
    assert _equal(in_place[order], copied)


@pytest.mark.parametrize(
    "x, size",
    [
        ([], 4),
        ([0], 1),
        ([3, 3, 3], 4),
        ([5, 1, 5, 3, 0, 7], 8),
        (list(range(9, -1, -1)), 10),
        ("random", 49152),
    ],
)
def test_index_set_is_torch_unique(x, size, monkeypatch):
    """Counting instead of sorting: the same distinct values and inverse as torch.unique, native or not."""
    x = torch.randint(0, size, (5000,), generator=torch.Generator().manual_seed(0)) if x == "random" else x
    x = torch.tensor(x, dtype=torch.long)
    monkeypatch.setattr(bounded_mod, "INDEX_SET_MIN", 0)  # the kernel for the small ones too
    want = torch.unique(x, return_inverse=True)
    for got in both(monkeypatch, lambda: bounded_mod.index_set(x, size)):
        assert _equal(got, want)


@needs_native
@pytest.mark.parametrize(
    "tokens, pairs, kernel", [(512, 10, "pair_dots"), (512, 2000, "gathered_dots"), (16, 1000, "pair_dots")]
)
def test_sampled_products_pick_the_kernel_by_operand_size(tokens, pairs, kernel, monkeypatch):
    """Pairs are read in place while a and b fit in cache, or while they are few; else the columns are copied.
    (512 x (300 + 200) floats: past PAIR_CACHE_BYTES; 16 x 500: within it.)"""
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(tokens, 300, generator=gen), torch.randn(tokens, 200, generator=gen)
    flat = torch.randperm(300 * 200, generator=gen)[:pairs].sort().values
    calls: dict = {}
    for name in ("pair_dots", "gathered_dots"):
        monkeypatch.setattr(native, name, _counted(calls, name, getattr(native, name)))
    got = bounded_mod.sampled_products(a, b, flat // 200, flat % 200)
    assert list(calls) == [kernel]
    assert torch.allclose(got, (a.t() @ b).view(-1)[flat], atol=1e-4)


@pytest.mark.parametrize("pair_factor", [0, 10**9])  # copies + dot products / pairs read in place
def test_sampled_products_do_not_depend_on_the_other_pairs(pair_factor, monkeypatch):
    monkeypatch.setattr(bounded_mod, "PAIR_FACTOR", pair_factor)
    monkeypatch.setattr(bounded_mod, "PAIR_FACTOR_LARGE", pair_factor)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(70, 24, generator=gen), torch.randn(70, 20, generator=gen)
    every = torch.arange(480)
    all_values = bounded_mod.gathered_products(a, b, every)
    some = torch.tensor([417, 3, 250, 67])
    monkeypatch.setattr(bounded_mod, "PAIR_FACTOR", 10**9 - pair_factor)  # the other kernel for the few
    monkeypatch.setattr(bounded_mod, "PAIR_FACTOR_LARGE", 10**9 - pair_factor)
    assert _equal(bounded_mod.gathered_products(a, b, some), all_values[some])


def _bound_values(an, bn, w, exp, low):
    """The kernel's full test, Σ_g an·bn (minus low·|θ| for exp 1), in its float operations and order."""
    acc = torch.zeros(an.shape[1], bn.shape[1])
    for g in range(an.shape[0]):
        acc = acc + an[g, :, None] * bn[g][None, :]
    return (acc - torch.tensor(low) * w.abs() if exp == 1 else acc).view(-1)


@needs_native
@pytest.mark.parametrize("exp", [0, 1])
# tiny: the norms' squares underflow; special: zeros and an inf
@pytest.mark.parametrize("scale", ["plain", "tiny", "special"])
@pytest.mark.parametrize("groups", [1, 16, 64])
def test_bound_hits_prefilter_keeps_every_hit(exp, scale, groups):
    """The Cauchy-Schwarz prefilter may only skip entries the full test rejects: the hits are exactly the
    full G-term test's, at levels from everything-passes to almost-nothing-passes."""
    gen = torch.Generator().manual_seed(groups + 7 * exp)
    rows, cols = 50, 77  # a partial strip of 32 columns
    an = torch.rand(groups, rows, generator=gen) ** 4  # skewed, as gradient norms are
    bn = torch.rand(groups, cols, generator=gen) ** 4
    w = torch.randn(rows, cols, generator=gen) * 0.05
    if scale == "tiny":
        an, bn = an * 1e-21, bn * 1e-21  # squares below float's smallest subnormal
    if scale == "special":
        an[:, 3], bn[:, 5], w[7, :] = 0.0, 0.0, 0.0
        an[0, 9] = float("inf")
    products = (an.double().t() @ bn.double()).view(-1)
    low = float(torch.quantile(products[torch.isfinite(products)], 0.9)) if exp == 1 else 1.0
    values = _bound_values(an, bn, w, exp, low)  # the full test's float values, so levels can sit on them
    finite = torch.sort(values[torch.isfinite(values)]).values
    for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0]:  # from everything passing to one entry or none
        level = float(finite[min(int(q * finite.numel()), finite.numel() - 1)]) if q else -1.0
        low = level if exp == 0 else low
        for r0, r1 in [(0, rows), (11, 12), (20, 45)]:
            got = native.bound_hits(an, bn, w, r0, r1, exp, low, level)
            want = (values.view(rows, cols)[r0:r1].reshape(-1) >= level).nonzero().view(-1)
            assert torch.equal(got, want), (q, r0, r1)


@needs_native
@pytest.mark.parametrize("tokens,groups", [(37, 16), (16, 16), (5, 1), (64, 3)])
def test_native_group_norms_bound_the_exact_norms(tokens, groups, monkeypatch):
    gen = torch.Generator().manual_seed(tokens)
    a = torch.randn(tokens, 50, generator=gen) * torch.rand(1, 50, generator=gen) * 10
    a[3, 4] = 1e-30  # a square that underflows
    calls = {}
    torch_norms, native_norms = both(monkeypatch, lambda: bounded_mod.group_norms(a, groups), calls)
    assert calls.get("group_square_sums") == 1
    member = torch.arange(tokens) * groups // tokens
    exact = torch.stack([a.double()[member == g].square().sum(0).sqrt() for g in range(groups)])
    assert bool((native_norms.double() >= exact).all()) and bool((torch_norms.double() >= exact).all())
    torch.testing.assert_close(native_norms, torch_norms, rtol=1e-6, atol=1e-30)


@needs_native
def test_push_block_native_equals_push_flat_on_blocks_in_any_order(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    blocks = [(torch.randn(300, generator=gen) * s, torch.randn(300, generator=gen)) for s in (1, 3, 0.1, 2)]
    blocks[2][0][17] = float("inf")  # a non-finite score: that block is the torch code's (and it says so)
    blocks[3][1][4] = float("nan")
    excluded = torch.tensor([0, 5, 250])

    def run():
        top, scorer = StreamingTopK(20), TensorScorer(d3_scores, keep_grads=True)
        for i in (1, 0, 3, 2):
            push_block(top, scorer, blocks[i][0], blocks[i][1], 1000 * i, excluded)
        return (*top.result(), top.result_payload(), scorer.finite)

    calls = {}
    assert _equal(*both(monkeypatch, run, calls))
    assert calls == {"score_block": 3}  # the first block fills the top-k: the torch code's


def _train(steps=4):
    torch.manual_seed(0)
    model = tiny_bert().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ID3Engine(model, ID3Config(budget=300, weight_grads="bounded"))
    engine.start(steps)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    for batch in token_batches("cls", steps=steps):
        model(**batch).loss.backward()
        engine.step()
        opt.step()
        opt.zero_grad()
    return engine.unmasked.state_dict(), copy.deepcopy(model.state_dict())


@needs_native
@pytest.mark.parametrize("dense_tokens", [0, 10**6])  # the bound / GEMM rows over the live tokens
def test_training_with_native_kernels_is_the_torch_run(dense_tokens, monkeypatch):
    """GEMM rows: bitwise. The bound: its dot products sum in another order, so the same unmasked set and
    weights equal up to rounding (4 steps of training)."""
    monkeypatch.setattr(selection, "BOUNDED_MIN_ENTRIES", 0)
    monkeypatch.setattr(bounded_costs, "FIXED_TOKENS", dense_tokens)
    calls = {}
    (set_a, weights_a), (set_b, weights_b) = both(monkeypatch, _train, calls)
    assert calls["live_rows"] > 0 and calls["score_block" if dense_tokens else "bound_hits"] > 0
    if dense_tokens:
        assert _equal(set_a, set_b) and _equal(weights_a, weights_b)
        return
    assert calls.get("gathered_dots", 0) + calls.get("pair_dots", 0) > 0 and calls["group_square_sums"] > 0
    assert _equal(set_a, set_b)
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=1e-5, atol=1e-6)


def test_without_a_compiler_the_torch_code_runs_and_says_so_once(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached library to find
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setenv("ID3_NATIVE", "1")
    with pytest.warns(UserWarning, match="native kernels unavailable.*no C compiler"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert native.library() is None
        g, h = _grads(0, 32, 20, 8, 9)
        assert live_tokens(g, h).numel() == 12


def test_a_failed_build_falls_back_and_leaves_no_partial_library(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", ("-this-flag-does-not-exist",))
    monkeypatch.setenv("ID3_NATIVE", "1")
    with pytest.warns(UserWarning, match="native kernels unavailable"):
        assert native.library() is None
    assert not list((tmp_path / "id3_callback").glob("*"))  # the temporary file is gone, nothing cached


@needs_native
def test_the_library_is_cached_per_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("ID3_NATIVE", "1")
    assert native.library() is not None
    built = list((tmp_path / "id3_callback").glob("kernels-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(native, "_loaded", [])
    stamp = built[0].stat().st_mtime_ns
    assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-DANOTHER_BUILD"))
    assert native.library() is not None
    assert len(list((tmp_path / "id3_callback").glob("kernels-*.so"))) == 2
    monkeypatch.setenv("ID3_NATIVE", "0")
    assert native.library() is None


def _summary_of_a_bounded_engine() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ID3Engine(tiny_bert(), ID3Config(budget=50, weight_grads="bounded"))
    engine.start(4)
    try:
        return engine.summary()
    finally:
        engine.remove_hooks()


@pytest.mark.parametrize("how", ["native", "disabled", "no compiler"])
def test_the_plan_says_how_the_bounded_layers_are_scored(how, monkeypatch, tmp_path):
    monkeypatch.setattr(selection, "BOUNDED_MIN_ENTRIES", 0)
    monkeypatch.setattr(bounded_costs, "FIXED_TOKENS", None)  # the default: measured
    monkeypatch.setenv("ID3_NATIVE", "0" if how == "disabled" else "1")
    if how == "native" and native.library() is None:
        pytest.skip("no C compiler here")
    if how == "no compiler":
        monkeypatch.setattr(native, "_loaded", [])
        monkeypatch.setattr(native, "_why_not", [])
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setattr(native.shutil, "which", lambda name: None)
    text = _summary_of_a_bounded_engine()
    line = next(line for line in text.splitlines() if "bounded weight gradients (no dense dW)" in line)
    assert (
        "by their times on this machine over the first 4 scoring steps" in line
        and f"{bounded_mod.GROUPS} token groups" in line
    )
    expected = {
        "native": "native kernels (plain C",
        "disabled": "torch code (ID3_NATIVE=0)",
        "no compiler": "torch code (native kernels unavailable: no C compiler",
    }[how]
    assert expected in line
