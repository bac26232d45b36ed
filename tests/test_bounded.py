"""Bounded weight gradients (`ID3Config(weight_grads="bounded")`, id3_callback/bounded.py).

Two references. The kernel against brute force over the *same* score definition (every entry's gradient by
the same sampled dot product, or by the same GEMM rows): bitwise. The engine against the dense path
(autograd's GEMM): the chosen sets are equal except where two scores tie within fp32 rounding of the cut
(`helpers.same_up_to_rounding`), the optimizer's gradients agree to rounding, and a bounded run resumed from a
checkpoint is bitwise the uninterrupted bounded run.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import (
    assert_added_top_k,
    brute_force_topk,
    changed_entries,
    dense_reference,
    same_up_to_rounding,
    snapshot,
    tiny_bert,
    tiny_llama,
    token_batches,
    token_data,
    training_args,
)
from torch import nn

from id3_callback import (
    ID3Config,
    ID3Engine,
    SparseAdamW,
    apply_delta,
    bounded_costs,
    d3_scores,
    save_delta,
    selection,
)
from id3_callback import bounded as bounded_mod
from id3_callback.bounded import (
    bounded_weight_grad,
    gathered_products,
    group_norms,
    live_tokens,
    sampled_products,
    slack,
    unmasked_products,
)
from id3_callback.peft_utils import MODULES_TO_SAVE
from id3_callback.selection import StreamingTopK, TensorScorer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def small_layers(monkeypatch):
    """Tiny test models: every selectable Linear takes the bounded path, and the bound (not the few-tokens
    GEMM rows) scores it."""
    monkeypatch.setattr(selection, "BOUNDED_MIN_ENTRIES", 0)
    monkeypatch.setattr(bounded_costs, "FIXED_TOKENS", 0)


# ------------------------------------------------------------------------------------------------ the kernel
def _layer(seed=0, tokens=40, rows=24, cols=20, unmasked=30):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(tokens, rows, generator=g) * torch.rand(1, rows, generator=g) * 3
    b = torch.randn(tokens, cols, generator=g)
    w = torch.randn(rows, cols, generator=g) * 0.1
    idx = torch.randperm(rows * cols, generator=g)[:unmasked]
    return a, b, w, idx


def _kernel_top(a, b, w, idx, tau, k, eps=1e-3, exp=1.0):
    top = StreamingTopK(k)
    scorer = TensorScorer(lambda g, t: d3_scores(g, t, eps, exp), keep_grads=True)
    scorer.d3 = (eps, exp)
    scorer.bound_factor = (1 + 1e-5) / (torch.tensor(eps).item() ** exp if exp else 1.0)
    n, kept = bounded_weight_grad(a, b, w, idx, torch.sort(idx).values, tau, top, scorer, offset=0)
    values, index = top.result()
    return values, index, top.result_payload(), n, kept


def test_sampled_products_are_the_gemm_entries_and_independent_of_the_pattern():
    a, b, w, _ = _layer()
    every = torch.arange(w.numel())
    all_values = gathered_products(a, b, every)
    torch.testing.assert_close(all_values, (a.t() @ b).view(-1), rtol=1e-5, atol=1e-5)
    some = torch.tensor([417, 3, 250, 3 * 20 + 7])  # any order
    assert torch.equal(gathered_products(a, b, some), all_values[some])
    rows, cols = torch.tensor([0, 0, 5]), torch.tensor([1, 19, 2])
    assert torch.equal(sampled_products(a, b, rows, cols), all_values[rows * 20 + cols])


def test_group_norm_bound_holds_for_every_entry():
    a, b, w, _ = _layer(tokens=37)  # groups of unequal size
    an, bn = group_norms(a, 16), group_norms(b, 16)
    bound = (an.t() @ bn) * slack(37)
    assert bool(((a.t() @ b).abs() <= bound).all())
    assert bool((group_norms(torch.full((4, 2), 1e-30), 2) > 0).all())  # squares summed without underflow


@pytest.mark.parametrize("box_factor", [0, 2, 32, 10**9])  # gathered / rows x columns / rows x all (twice)
def test_unmasked_products_are_the_gemm_entries_in_their_order(box_factor, monkeypatch):
    monkeypatch.setattr(bounded_mod, "BOX_FACTOR", box_factor)
    a, b, w, _ = _layer(seed=3)
    rows = torch.tensor([5, 5, 2, 5, 2, 17, 2])  # clustered in 3 rows x 4 columns, in no order
    flat = rows * 20 + torch.tensor([3, 9, 3, 0, 11, 9, 0])
    got = unmasked_products(a, b, flat)
    torch.testing.assert_close(got, (a.t() @ b).view(-1)[flat], rtol=1e-5, atol=1e-6)
    assert torch.equal(got, unmasked_products(a, b, flat.clone()))  # deterministic
    assert unmasked_products(a, b, flat[:0]).numel() == 0


def test_live_tokens_drop_exactly_the_tokens_that_add_nothing():
    g, h, *_ = _layer(seed=4, tokens=32)
    g[::2] = 0.0  # half the tokens have no output gradient
    g[6, 1] = float("nan")  # a non-finite gradient row is kept
    g[1, 0] = 0.0  # starts with a zero, live further on: kept
    h[4, 1] = float("inf")  # a zero gradient row against a non-finite input: 0·inf is NaN, kept
    keep = live_tokens(g, h)
    assert sorted(keep.tolist()) == keep.tolist()
    assert set(keep.tolist()) == set(range(1, 32, 2)) | {4, 6}
    want = g.t() @ h
    got = g[keep].t() @ h[keep]
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert live_tokens(torch.randn(8, 3), torch.randn(8, 4)) is None  # nothing to drop
    assert live_tokens(torch.zeros(8, 3), torch.randn(8, 4)).tolist() == [0]  # every product zero


@pytest.mark.parametrize("exp", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("fraction", [2.0, 0.0, 0.08])  # never a GEMM block / always / the default
@pytest.mark.parametrize("tau_of_cut", [0.0, 0.9, 1.0])  # every tau at or below the final cut certifies
def test_kernel_equals_brute_force_over_the_same_scores(exp, fraction, tau_of_cut, monkeypatch):
    monkeypatch.setattr(bounded_mod, "DENSE_FRACTION", fraction)
    monkeypatch.setattr(bounded_mod, "BLOCK_ENTRIES", 96)  # row blocks of 4 rows
    a, b, w, idx = _layer(seed=1)
    k = 25
    # Each entry's gradient as this path computes it: tau = 0 verifies everything with one GEMM; a dense
    # block is a GEMM of its 4 rows; otherwise a sampled dot product.
    if tau_of_cut == 0.0:
        grads = (a.t() @ b).view(-1)
    elif fraction == 0.0:
        grads = torch.cat([a[:, r : r + 4].t().mm(b).view(-1) for r in range(0, 24, 4)])
    else:
        grads = gathered_products(a, b, torch.arange(w.numel()))
    scores = d3_scores(grads, w.view(-1), 1e-3, exp)
    scores[idx] = float("-inf")
    expected = brute_force_topk([scores], k)
    cut = scores[expected[-1]].item()
    values, index, payload, n, kept = _kernel_top(a, b, w, idx, tau_of_cut * cut, k, exp=exp)
    # tau = 0: the unmasked entries' values come from the same GEMM rows as every score
    assert torch.equal(kept, grads[idx] if tau_of_cut == 0.0 else unmasked_products(a, b, idx))
    if fraction == 0.08 and tau_of_cut > 0:  # blocks of both kinds: scores agree to rounding
        assert same_up_to_rounding(set(index.tolist()), set(expected.tolist()), scores, cut)
        torch.testing.assert_close(values, scores[index], rtol=1e-5, atol=0)
        return
    assert torch.equal(index, expected)
    assert torch.equal(values, scores[expected])
    assert torch.equal(payload, grads[expected])
    if tau_of_cut > 0 and fraction == 2.0:
        assert n < w.numel() - idx.numel()  # the bound pruned something


def test_kernel_above_the_cut_misses_entries_which_certify_then_rescores():
    a, b, w, idx = _layer(seed=1)
    values, *_ = _kernel_top(a, b, w, idx, 0.0, 25)
    high = 1.5 * values[-1].item()
    values, *_ = _kernel_top(a, b, w, idx, high, 25)
    assert values.numel() < 25 or values[-1] < high  # c < tau: not certified


def test_kernel_ties_go_to_the_lower_index(monkeypatch):
    monkeypatch.setattr(bounded_mod, "DENSE_FRACTION", 2.0)
    a = torch.ones(8, 6)
    b = torch.ones(8, 5)  # every gradient 8, every weight the same: all scores tie
    w = torch.full((6, 5), 0.5)
    idx = torch.tensor([2, 0])
    values, index, *_ = _kernel_top(a, b, w, idx, 8 / 0.501 * 0.99, 4)
    assert index.tolist() == [1, 3, 4, 5]


def test_rescoring_a_layer_adds_each_entry_once(monkeypatch):
    monkeypatch.setattr(bounded_mod, "BLOCK_ENTRIES", 96)
    a, b, w, idx = _layer(seed=2)
    ex = torch.sort(idx).values
    top = StreamingTopK(400)  # bigger than the layer: every pushed entry stays
    scorer = TensorScorer(d3_scores, keep_grads=True)
    values, index, *_ = _kernel_top(a, b, w, idx, 0.0, 400)
    high = values[40].item()
    bounded_weight_grad(a, b, w, idx, ex, high, top, scorer, 0)
    bounded_weight_grad(a, b, w, idx, ex, 0.0, top, scorer, 0, previous_tau=high)
    got = top.result()[1]
    assert got.unique().numel() == got.numel() == index.numel()
    assert set(got.tolist()) == set(index.tolist())


# -------------------------------------------------------------------------------------- through the engine


def _step_against_dense(model, engine, batch, scores, after_backward=None) -> tuple[set, int]:
    """Backward and `engine.step()`; asserts the entries the step added are the dense top-k of `scores` up to
    fp32 rounding ties at the cut. Returns them (global indices) and the step's k."""
    before = {n: i.numel() for n, i in engine.unmasked.indices.items()}
    k = engine.schedule.target(engine.steps_done + 1) - len(engine.unmasked)
    model(**batch).loss.backward()
    if after_backward is not None:
        after_backward()
    engine.step()
    return assert_added_top_k(engine, before, k, scores), k


MODELS = {
    "bert": (lambda: tiny_bert(), "cls"),
    "llama": (lambda: tiny_llama(attention_bias=True), "lm"),
    "llama-tied": (lambda: _tied_llama(), "lm"),
}


def _tied_llama():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _engine(model, budget=400, steps=6, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ID3Engine(model, ID3Config(budget=budget, weight_grads="bounded", **kw))
    engine.start(steps)
    return engine


@pytest.mark.parametrize("model_key", list(MODELS))
def test_engine_selects_the_dense_top_k_and_feeds_the_optimizer_exact_gradients(model_key):
    make, kind = MODELS[model_key]
    model = make().eval()  # no dropout: the reference copy sees the same function
    engine = _engine(model)
    assert engine.bounded is not None and engine.unmasked.params.keys() >= engine.bounded.layers.keys()
    if model_key == "llama-tied":  # the tied table, through its output layer (bounded_tied.py)
        assert engine.bounded.layers["model.embed_tokens.weight"][0] is model.lm_head
    if model_key == "llama":
        assert "lm_head.weight" in engine.bounded.layers  # the untied output layer
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    for batch in token_batches(kind, steps=6):
        scores, dense_grads = dense_reference(model, engine, batch)

        def never_allocated():
            for name in engine.bounded.layers:
                assert engine.unmasked.params[name].grad is None

        new, k = _step_against_dense(model, engine, batch, scores, never_allocated)
        assert len(new) == k
        for name in engine.bounded.layers:  # the optimizer's gradients: the unmasked entries', to rounding
            stash = engine.unmasked.grad_stash.get(name)
            want = dense_grads[name][engine.unmasked.indices[name]]
            torch.testing.assert_close(stash, want, rtol=1e-4, atol=1e-6)
        norm = engine.grad_norm()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(norm)
    metrics = engine.log_metrics()
    assert 0 < metrics["id3/bound_survivors"] <= 1 and "id3/uncertified_steps" in metrics


def test_padded_batches_drop_dead_tokens_and_still_select_the_dense_top_k(monkeypatch):
    """Padding and the unpooled positions of a classifier give all-zero gradient rows: dropped from the products
    (`live_tokens`), the selection and the optimizer's gradients are still the dense path's."""
    dropped = []
    live = bounded_mod.live_tokens
    monkeypatch.setattr(bounded_mod, "live_tokens", lambda g, h: dropped.append(live(g, h)) or dropped[-1])
    model = tiny_bert().eval()
    engine = _engine(model)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    for i, batch in enumerate(token_batches("cls", steps=4)):
        batch["attention_mask"] = batch["attention_mask"].clone()
        batch["attention_mask"][:, 12 - 3 - i :] = 0  # the last 3-6 tokens of every row are padding
        scores, dense_grads = dense_reference(model, engine, batch)
        _step_against_dense(model, engine, batch, scores)
        for name in engine.bounded.layers:
            stash = engine.unmasked.grad_stash.get(name)
            torch.testing.assert_close(
                stash, dense_grads[name][engine.unmasked.indices[name]], rtol=1e-4, atol=1e-6
            )
        opt.step()
        opt.zero_grad()
    assert any(keep is not None and keep.numel() < 4 * 12 for keep in dropped)


def test_layers_with_few_live_tokens_are_scored_whole_by_gemm_rows(monkeypatch):
    """The cost model's other branch: every entry verified from GEMM rows, so no step is ever uncertified,
    even with a threshold guess far above the cut."""
    monkeypatch.setattr(bounded_costs, "FIXED_TOKENS", 10**6)
    monkeypatch.setattr(bounded_mod, "MARGIN", 1e6)
    model = tiny_bert().eval()
    engine = _engine(model)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    for batch in token_batches("cls", steps=4):
        scores, dense_grads = dense_reference(model, engine, batch)
        _step_against_dense(model, engine, batch, scores)
        assert engine.bounded.last_step["dense"] == 1.0 and engine.bounded.last_step["survivors"] == 1.0
        for name in engine.bounded.layers:
            assert engine.unmasked.params[name].grad is None
            want = dense_grads[name][engine.unmasked.indices[name]]
            torch.testing.assert_close(engine.unmasked.grad_stash[name], want, rtol=1e-4, atol=1e-6)
        opt.step()
        opt.zero_grad()
    assert engine.bounded.uncertified_steps == 0


def test_forced_uncertified_steps_are_rescored_and_counted(monkeypatch):
    monkeypatch.setattr(bounded_mod, "MARGIN", 1e6)  # every guess far above the cut
    model = tiny_bert().eval()
    engine = _engine(model)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    for batch in token_batches("cls", steps=5):
        scores, _ = dense_reference(model, engine, batch)
        _step_against_dense(model, engine, batch, scores)
        opt.step()
        opt.zero_grad()
    assert engine.bounded.uncertified_steps == 4  # every step after the first (which verifies everything)
    assert engine.log_metrics()["id3/uncertified_steps"] == 4


def test_dense_and_bounded_runs_train_the_same_entries_to_the_same_weights():
    runs = []
    for mode in ("dense", "bounded"):
        model = tiny_bert().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = ID3Engine(model, ID3Config(budget=400, weight_grads=mode))
        engine.start(6)
        opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
        for batch in token_batches("cls", steps=6):
            model(**batch).loss.backward()
            engine.step()
            opt.step()
            opt.zero_grad()
        runs.append((model, engine))
    (m1, e1), (m2, e2) = runs
    assert e2.bounded is not None and e1.bounded is None
    for name in e1.unmasked.params:
        assert torch.equal(e1.unmasked.sorted_indices(name)[0], e2.unmasked.sorted_indices(name)[0])
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)


def test_linear_backward_is_autograds_bitwise_for_inputs_and_biases():
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    x = torch.randn(3, 5, 16, requires_grad=True)
    layer(x).pow(2).sum().backward()
    ref_x, ref_b = x.grad.clone(), layer.bias.grad.clone()
    x.grad = None
    layer.bias.grad = None
    layer.weight.grad = None
    engine = _engine(layer, budget=20, include="weight")  # the weight selectable, the bias not
    layer(x).pow(2).sum().backward()
    assert torch.equal(x.grad, ref_x) and torch.equal(layer.bias.grad, ref_b)
    assert layer.weight.grad is None
    engine.remove_hooks()
    assert "forward" not in layer.__dict__


def test_a_second_backward_before_step_says_how_to_fix():
    model = tiny_bert().eval()
    _engine(model)
    batch = next(iter(token_batches("cls", steps=1)))
    model(**batch).loss.backward()
    with pytest.raises(RuntimeError, match="weight_grads='dense'"):
        model(**batch).loss.backward()


@pytest.mark.parametrize(
    "settings, config, blocker",
    [
        ({"accumulation_steps": 2}, {}, "gradient_accumulation_steps=2"),
        ({"loss_scaling": True}, {}, "fp16 loss scaling"),
        ({}, {"method": "random"}, "method='random'"),
        ({}, {"optimizer": "trainer"}, "optimizer='trainer'"),
        ({}, {"low_memory": True}, "low_memory=True"),
    ],
)
def test_plan_falls_back_to_dense_gradients_and_says_why(settings, config, blocker):
    from id3_callback.plan import TrainingSettings

    with pytest.warns(UserWarning, match="weight_grads='bounded'"):
        engine = ID3Engine(
            tiny_bert(),
            ID3Config(budget=40, weight_grads="bounded", **config),
            settings=TrainingSettings(**settings),
        )
    assert not engine.plan.bounded_layers
    assert blocker in " ".join(engine.plan.bounded_blockers)
    assert "bounded weight gradients off" in engine.summary()


@pytest.mark.parametrize("recompute", [None, True])
def test_a_process_group_found_at_start_turns_the_bounded_path_and_its_recomputation_off(recompute):
    from id3_callback.plan import with_process_group

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ID3Engine(
            tiny_bert(), ID3Config(budget=40, weight_grads="bounded", recompute_pointwise=recompute)
        )
    assert engine.plan.bounded_layers and engine.plan.recompute and engine.plan.bounded_kernels
    with pytest.warns(UserWarning, match="cannot apply under DDP"):
        plan = with_process_group(engine.plan, engine.config, engine.method)
    assert not plan.bounded_layers and not plan.bounded_kernels and plan.bounded_blockers
    assert plan.recompute is bool(recompute)  # auto-on only for the bounded path; an explicit True stays


def test_config_rejects_an_unknown_weight_grads():
    with pytest.raises(ValueError, match="'dense' or 'bounded'"):
        ID3Config(weight_grads="sparse")


def test_conv1d_layers_take_the_bounded_path():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=False)
    ).eval()
    engine = _engine(model)
    assert any(kind == "conv1d" for _, kind in engine.bounded.layers.values())
    for batch in token_batches("lm", steps=3):
        batch.pop("attention_mask")
        scores, dense_grads = dense_reference(model, engine, batch)
        _step_against_dense(model, engine, batch, scores)
        for name in engine.bounded.layers:
            torch.testing.assert_close(
                engine.unmasked.grad_stash[name],
                dense_grads[name][engine.unmasked.indices[name]],
                rtol=1e-4,
                atol=1e-6,
            )
        engine.unmasked.grad_stash.clear()
        model.zero_grad()


# ------------------------------------------------------------------------------------------ through the Trainer
def lora_bert(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], bias="lora_only")
    return get_peft_model(tiny_bert(seed=seed), config)


TRAINER_MODELS = {
    "bert": (tiny_bert, "cls", {}),
    "llama": (lambda: tiny_llama(attention_bias=True), "lm", {}),
    "llama-tied": (_tied_llama, "lm", {}),
    "lora": (lora_bert, "cls", {"dense": MODULES_TO_SAVE}),
}


def _train(model_key, tmp_path, mode="bounded", save=False, resume=None, out="out"):
    from transformers import TrainerCallback

    from id3_callback import ID3Callback, ID3Trainer
    from id3_callback.logging import MaskHeatmapCallback

    class SaveAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = state.global_step == 3

    make, kind, overrides = TRAINER_MODELS[model_key]
    model = make()
    before = snapshot(model)
    config = ID3Config(budget=60, weight_grads=mode, **overrides)
    args = training_args(
        tmp_path,
        output_dir=str(tmp_path / out),
        per_device_train_batch_size=4,
        max_steps=6,
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=3,
        save_strategy="no",
    )
    trainer = ID3Trainer(
        model=model,
        args=args,
        train_dataset=token_data(n=24, seq=8, kind=kind),
        callbacks=[ID3Callback(config), *([SaveAtStep3()] if save else [])],
    )
    trainer.remove_callback(MaskHeatmapCallback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, before


@pytest.mark.parametrize("model_key", list(TRAINER_MODELS))
def test_trainer_matrix_budget_masks_delta_and_bitwise_resume(model_key, tmp_path):
    trainer, model, before = _train(model_key, tmp_path, save=True)
    engine = trainer.engine
    assert engine.bounded is None  # removed at train end
    assert engine.plan.bounded_layers  # but it ran
    assert len(engine.unmasked) == engine.budget == 60
    changed = changed_entries(before, model)
    for name, idx in changed.items():
        if name in engine.unmasked.params:
            stray = set(idx.tolist()) - set(engine.unmasked.trained_indices(name)[0].tolist())
            assert not stray, f"{len(stray)} masked entries of {name} changed"
    assert sum(i.numel() for i in changed.values()) > 0
    path = save_delta(trainer, tmp_path / "delta.safetensors")
    base = TRAINER_MODELS[model_key][0]()
    apply_delta(base, path)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), model.state_dict().values()))
    logged = [entry for entry in trainer.state.log_history if "id3/bound_survivors" in entry]
    assert logged and all("id3/uncertified_steps" in entry for entry in logged)

    resumed, model2, _ = _train(
        model_key, tmp_path, resume=str(tmp_path / "out" / "checkpoint-3"), out="resumed"
    )
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
    assert resumed.engine.unmasked.fingerprint() == engine.unmasked.fingerprint()

    dense, model3, _ = _train(model_key, tmp_path, mode="dense", out="dense")
    # Same function, same batches; selections agree up to rounding ties and weights up to rounding.
    for a, b in zip(model.parameters(), model3.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
