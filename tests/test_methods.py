"""Every selection method through the same engine: one table, generic checks, plus per-method specifics.

Matrix: each method x {tiny BERT classifier, tiny Llama LM, LoRA-wrapped tiny BERT} trains 6 steps with
weight_decay=0.1 through ID3Trainer and checks: budget exact, untouched entries bit-identical, base + delta
== trained (bitwise). Resume (checkpoint at step 3, resume, compare with the uninterrupted run bitwise) runs
for every method on the BERT classifier and for a few methods on the other two models.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import (
    MLP,
    brute_force_topk,
    changed_entries,
    mlp_data,
    snapshot,
    tiny_bert,
    tiny_llama,
    token_batches,
    token_data,
    training_args,
)
from transformers import TrainerCallback

from id3_callback import (
    ID3Config,
    ID3Engine,
    SparseAdamW,
    apply_delta,
    available_methods,
    d3_scores,
    save_delta,
)
from id3_callback.methods.fish import fisher_information
from id3_callback.methods.random_mask import sample_without_replacement
from id3_callback.peft_utils import MODULES_TO_SAVE

BUDGET = 60
STEPS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def lora_bert(seed: int = 0):
    """Tiny BERT with LoRA on query/value, trainable base biases there, and a modules_to_save classifier."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], bias="lora_only")
    return get_peft_model(tiny_bert(seed=seed), config)


# name -> (model factory, dataset factory, ID3Config overrides)
MODELS = {
    "bert": (tiny_bert, lambda: token_data(n=24, seq=8, kind="cls"), {}),
    "llama": (lambda: tiny_llama(attention_bias=True), lambda: token_data(n=24, seq=8, kind="lm"), {}),
    "lora": (lora_bert, lambda: token_data(n=24, seq=8, kind="cls"), {"dense": MODULES_TO_SAVE}),
}

# method -> expected budget given the engine (None: the configured BUDGET)
METHODS = {
    "id3": None,
    "static": None,
    "repeat": None,
    "increment-magnitude": None,
    "pafi": None,
    "fish": None,
    "random": None,
    "bitfit": lambda e: sum(p.numel() for n, p in e.unmasked.params.items() if n.endswith("bias")),
    "full": lambda e: e.selectable,
}

# Resume (the costliest check: a checkpoint and a second run) covers every method on one model at least.
RESUME = {
    "bert": {"id3", "static", "pafi", "random", "full"},
    "llama": {"fish", "increment-magnitude", "repeat"},
    "lora": {"bitfit", "repeat"},
}


def test_table_covers_every_registered_method():
    assert set(METHODS) == set(available_methods())
    assert set().union(*RESUME.values()) == set(METHODS)


class _SaveAtStep3(TrainerCallback):
    """One checkpoint, at step 3 (save_strategy='steps' would also write one at step 6)."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step == 3


def _train(model_key, method, tmp_path, save=False, resume=None, out="out"):
    from id3_callback import ID3Callback, ID3Trainer
    from id3_callback.logging import MaskHeatmapCallback

    make_model, make_data, overrides = MODELS[model_key]
    model = make_model()
    before = snapshot(model)
    config = ID3Config(budget=BUDGET, method=method, fisher_samples=8, **overrides)
    args = training_args(
        tmp_path,
        output_dir=str(tmp_path / out),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        weight_decay=0.1,
        logging_steps=STEPS,
        save_strategy="no",
    )
    callbacks = [ID3Callback(config), *([_SaveAtStep3()] if save else [])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitfit/full announce their fixed budget
        trainer = ID3Trainer(model=model, args=args, train_dataset=make_data(), callbacks=callbacks)
    trainer.remove_callback(MaskHeatmapCallback)  # PNG rendering is tested elsewhere
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, before


def _trainable_entries(engine, name):
    """Flat indices `name` may have changed; None: all of them."""
    u = engine.unmasked
    if name in u.dense or name in u.full:
        return None
    if name in u.params:
        return u.trained_indices(name)[0]
    return torch.empty(0, dtype=torch.long)


def _bitwise_equal(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sb = dict(b.named_parameters())
    return [
        n for n, p in a.named_parameters() if not torch.equal(p.detach().view(-1), sb[n].detach().view(-1))
    ]


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("method", list(METHODS))
def test_method_matrix(method, model_key, tmp_path):
    resume = method in RESUME[model_key]
    trainer, model, before = _train(model_key, method, tmp_path, save=resume)
    engine = trainer.engine

    # Budget exact.
    expected = METHODS[method](engine) if METHODS[method] else BUDGET
    assert engine.budget == expected
    assert len(engine.unmasked) == expected
    assert engine.steps_done == STEPS

    # Untouched entries bit-identical (weight decay on), and training did change something.
    changed = changed_entries(before, model)
    moved = 0
    for name, idx in changed.items():
        moved += idx.numel()
        allowed = _trainable_entries(engine, name)
        if allowed is not None:
            stray = set(idx.tolist()) - set(allowed.tolist())
            assert not stray, f"{method}/{model_key}: {len(stray)} masked entries of {name} changed"
    assert moved > 0
    if method == "full":  # every selectable tensor trained through SparseAdamW, with no index lists
        assert set(engine.unmasked.full) == set(engine.unmasked.params)
        assert all(i.numel() == 0 for i in engine.unmasked.indices.values())

    # base + delta == trained, bitwise.
    path = save_delta(trainer, tmp_path / "delta.safetensors")
    base = MODELS[model_key][0]()
    apply_delta(base, path)
    assert _bitwise_equal(base, model) == []

    # Resume from step 3 == uninterrupted, bitwise (weights and masks).
    if resume:
        resumed, model2, _ = _train(
            model_key, method, tmp_path, resume=str(tmp_path / "out" / "checkpoint-3"), out="resumed"
        )
        assert _bitwise_equal(model2, model) == []
        u1, u2 = engine.unmasked, resumed.engine.unmasked
        assert u2.fingerprint() == u1.fingerprint()
        for name in u1.params:
            assert torch.equal(u2.trained_indices(name)[0], u1.trained_indices(name)[0])
            assert torch.equal(u2.trained_indices(name)[1], u1.trained_indices(name)[1])


# --------------------------------------------------------------------------------------- per-method checks
def _mlp_engine(method, budget=20, **kw):
    torch.manual_seed(0)
    model = MLP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ID3Engine(model, ID3Config(budget=budget, method=method, **kw))
    return model, engine


def _mlp_batches(n_batches=3, batch=4):
    data = mlp_data(n=n_batches * batch)
    return [
        (data.columns["x"][i : i + batch], data.columns["labels"][i : i + batch])
        for i in range(0, n_batches * batch, batch)
    ]


def test_fish_matches_hand_computed_fisher_and_restores_state():
    model, engine = _mlp_engine("fish", budget=25, fisher_samples=8)
    batches = _mlp_batches(n_batches=3, batch=4)  # 8 samples -> the first two batches
    names = list(engine.unmasked.params)
    expected = {n: torch.zeros_like(p) for n, p in engine.unmasked.params.items()}
    for x, y in batches[:2]:
        grads = torch.autograd.grad(model(x, y)["loss"], [engine.unmasked.params[n] for n in names])
        for n, g in zip(names, grads):
            expected[n] += g * g

    def loader():
        for x, y in batches:
            torch.randn(3)  # consumes RNG: the pass must undo it
            yield model(x, y)["loss"], len(y)

    sentinel = torch.full_like(model.net[0].weight, 7.0)
    model.net[0].weight.grad = sentinel
    model.train()
    model.net[2].eval()
    rng = torch.get_rng_state()
    fisher, used = fisher_information(engine.model, engine.unmasked.params, loader(), samples=8)
    assert used == 8
    for n in names:
        torch.testing.assert_close(fisher[n], expected[n])
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.net[0].weight.grad is sentinel and model.net[2].bias.grad is None
    assert model.training and model.net[0].training and not model.net[2].training

    # The mask is the top-B of that estimate (ties by lower global index, none expected here).
    engine.start(4, calibration_batches=loader)
    flat = torch.cat([expected[n].reshape(-1) for n in names])
    want = set(torch.argsort(flat, descending=True, stable=True)[:25].tolist())
    offsets = torch.tensor([0] + [engine.unmasked.params[n].numel() for n in names]).cumsum(0)
    got = {int(i) + int(offsets[k]) for k, n in enumerate(names) for i in engine.unmasked.indices[n]}
    assert got == want and len(engine.unmasked) == 25


class _Probe(TrainerCallback):
    """Records the RNG state and train flags at on_train_begin (placed before / after ID3Callback)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.rng = torch.get_rng_state()
        self.training = [m.training for m in model.modules()]
        self.grads = [p.grad for p in model.parameters()]


def test_fish_in_the_trainer_leaves_rng_modes_and_grads_as_they_were(tmp_path):
    from id3_callback import ID3Callback, ID3Trainer

    model = tiny_bert()  # dropout 0.1: a pass in train mode would draw random numbers
    before, after = _Probe(), _Probe()
    config = ID3Config(budget=BUDGET, method="fish", fisher_samples=12)
    args = training_args(tmp_path, per_device_train_batch_size=4, max_steps=1)
    trainer = ID3Trainer(
        model=model,
        args=args,
        train_dataset=token_data(n=24, seq=8),
        callbacks=[before, ID3Callback(config), after],
    )
    trainer.train()
    assert trainer.engine.method.samples_used == 12
    assert torch.equal(before.rng, after.rng)
    assert before.training == after.training and all(after.training)
    assert all(g is None for g in after.grads)


def test_fish_without_data_says_how_to_fix():
    _, engine = _mlp_engine("fish")
    with pytest.raises(ValueError, match="calibration_batches"):
        engine.start(4)


def test_pafi_selects_smallest_magnitudes_and_increment_magnitude_ends_there():
    model, engine = _mlp_engine("pafi", budget=30)
    engine.start(5)
    names = list(engine.unmasked.params)
    flat = torch.cat([engine.unmasked.params[n].detach().reshape(-1).abs() for n in names])
    want = torch.sort(torch.argsort(flat, stable=True)[:30]).values
    sizes = [engine.unmasked.params[n].numel() for n in names]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    got = torch.sort(torch.cat([engine.unmasked.indices[n] + offsets[k] for k, n in enumerate(names)])).values
    assert torch.equal(got, want)

    # increment-PaFi: same set, reached over 5 steps (masked weights never change, so the ranking holds).
    model2, inc = _mlp_engine("increment-magnitude", budget=30)
    inc.start(5)
    opt = SparseAdamW(inc.parameters(), inc.unmasked, lr=1e-2)
    counts = []
    for x, y in _mlp_batches(n_batches=5):
        model2(x, y)["loss"].backward()
        inc.step()
        opt.step()
        opt.zero_grad()
        counts.append(len(inc.unmasked))
    assert counts == [6, 12, 18, 24, 30]
    assert inc.unmasked.fingerprint() == engine.unmasked.fingerprint()


def test_random_is_deterministic_distinct_and_uniform():
    sets = []
    for seed in (1, 1, 2):
        _, engine = _mlp_engine("random", budget=40, mask_seed=seed)
        engine.start(3)
        sets.append(engine.unmasked.fingerprint())
        assert len(engine.unmasked) == 40
    assert sets[0] == sets[1] != sets[2]

    # Sparse regime (rejection of duplicates) and dense regime (2k > n): distinct, in range.
    for n, k in ((1000, 300), (1000, 900), (10**12, 1000)):
        draw = sample_without_replacement(n, k, torch.Generator().manual_seed(0))
        assert draw.numel() == k == torch.unique(draw).numel()
        assert int(draw.min()) >= 0 and int(draw.max()) < n

    # Uniform-ish: over 200 draws of 100 out of 1000, every decile holds ~10% (2000 expected hits each).
    hits = torch.zeros(10)
    for seed in range(200):
        draw = sample_without_replacement(1000, 100, torch.Generator().manual_seed(seed))
        hits += torch.bincount(draw // 100, minlength=10)
    assert hits.sum() == 20000
    assert (hits - 2000).abs().max() < 200  # ~4.5 standard deviations


def test_bitfit_selects_exactly_the_biases():
    model = tiny_bert()
    with pytest.warns(UserWarning, match="bitfit"):
        engine = ID3Engine(model, ID3Config(budget=10, method="bitfit"))
    engine.start(4)
    biases = {n: p for n, p in model.named_parameters() if n.endswith("bias")}
    assert engine.budget == len(engine.unmasked) == sum(p.numel() for p in biases.values())
    for name, idx in engine.unmasked.indices.items():
        expected = engine.unmasked.params[name].numel() if name in biases else 0
        assert idx.numel() == expected and torch.equal(torch.sort(idx).values, torch.arange(expected))
    assert "BitFit" in engine.summary()


def test_bitfit_budget_counts_dense_entries_inside_the_budget():
    # MLP: the selectable biases hold 16 entries (net.0.bias); the dense head net.2 holds 16 * 3 + 3 = 51.
    def build(budget, inside):
        config = ID3Config(budget=budget, method="bitfit", dense=r"net\.2\.", dense_in_budget=inside)
        return ID3Engine(MLP(), config)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # totals that match the configured budget: silent
        assert build(16 + 51, inside=True).budget == 16
        assert build(16, inside=False).budget == 16
    # A budget smaller than the dense entries is not refused: bitfit does not use it, and says what it trains.
    with pytest.warns(UserWarning, match=r"16 entries \+ 51 dense entries counted in the budget, not the "):
        engine = build(5, inside=True)
    assert engine.budget == 16 and engine.dense_entries == 51
    engine.start(2)
    assert len(engine.unmasked) == 16
    x, y = mlp_data(n=8).columns.values()
    for _ in range(2):
        engine.model(x, y)["loss"].backward()
        engine.step()
    metrics = engine.log_metrics()
    assert metrics["id3/updates_total"] == 2 * (16 + 51)
    assert metrics["id3/updates_vs_static"] == 1.0 and metrics["id3/budget_used"] == 1.0
    assert "51 entries, inside the budget" in engine.summary()


def test_bitfit_without_biases_is_a_clear_error():
    model = torch.nn.Linear(4, 2, bias=False)
    with pytest.raises(ValueError, match="no selectable parameter whose name ends with 'bias'"):
        ID3Engine(model, ID3Config(method="bitfit"))


def test_full_matches_dense_adamw():
    model, engine = _mlp_engine("full")
    engine.start(3)
    torch.manual_seed(0)
    reference = MLP()
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    for x, y in _mlp_batches():
        for m, o in ((model, opt), (reference, ref_opt)):
            m(x, y)["loss"].backward()
            if m is model:
                engine.step()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # same math, other rounding order
    assert engine.budget == len(engine.unmasked) == engine.selectable
    assert opt.state_bytes() == 3 * 4 * engine.selectable  # m, v, per-entry step: no index list


def _offsets(params) -> list[int]:
    sizes = [p.numel() for p in params]
    return [sum(sizes[:i]) for i in range(len(sizes))]


def test_repeat_replaces_the_set_and_keeps_moments_of_entries_that_stay(tmp_path):
    model, engine = _mlp_engine("repeat", budget=10)
    engine.start(6)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2, weight_decay=0.1)
    x_all = torch.randn(6, 8, 8, generator=torch.Generator().manual_seed(1))
    y_all = torch.randint(0, 3, (6, 8), generator=torch.Generator().manual_seed(2))
    base = snapshot(model)
    ever: dict[str, set] = {n: set() for n in engine.unmasked.params}
    continued = 0
    for x, y in zip(x_all, y_all):
        loss = model(x, y)["loss"]  # a new batch each step: the top-B moves
        loss.backward()
        old = {n: engine.unmasked.indices[n].clone() for n in engine.unmasked.params}
        old_state = {
            n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in engine.unmasked.params.items()
        }
        params = engine.unmasked.params.values()
        scores = torch.cat([d3_scores(p.grad, p.detach()).reshape(-1) for p in params])
        best = torch.argsort(scores, descending=True, stable=True)[
            :10
        ]  # every entry competes, ties: lower index
        engine.step()
        chosen = torch.cat([i + o for i, o in zip(engine.unmasked.indices.values(), _offsets(params))])
        assert sorted(chosen.tolist()) == sorted(best.tolist())
        before_step = snapshot(model)
        opt.step()
        opt.zero_grad()
        assert len(engine.unmasked) == 10
        moved = changed_entries(before_step, model)
        for name, p in engine.unmasked.params.items():
            current = engine.unmasked.indices[name]
            ever[name] |= set(current.tolist())
            # Only this step's set moves (masked entries keep still even if trained before).
            assert set(moved[name].tolist()) <= set(current.tolist())
            # Entries that stayed continued their Adam run: one more step than before.
            steps, old_steps = opt.state[p].get("step"), old_state[name].get("step", torch.zeros(0))
            for pos, i in enumerate(current.tolist()):
                prev = (old[name][: old_steps.numel()] == i).nonzero().view(-1)
                expect = float(old_steps[int(prev)]) + 1 if prev.numel() else 1.0
                assert float(steps[pos]) == expect
                continued += expect > 1
    # The delta covers every entry ever trained, and re-applies bitwise on the base model.
    union = sum(len(s) for s in ever.values())
    assert union > 10, "the set never changed: the test would not exercise replacement"
    assert continued > 0, "no entry stayed: the test would not exercise moment carry-over"
    moved = changed_entries(base, model)
    for name in engine.unmasked.params:
        idx, base_values = engine.unmasked.trained_indices(name)
        assert set(idx.tolist()) == ever[name] and set(moved[name].tolist()) <= ever[name]
        assert torch.equal(base_values, base[name].reshape(-1)[idx])  # first-seen values are the base
    torch.manual_seed(0)
    fresh = MLP()
    apply_delta(fresh, save_delta(engine, tmp_path / "repeat.safetensors"))
    assert _bitwise_equal(fresh, model) == []


def test_replace_keeps_first_seen_base_values():
    from id3_callback.masks import UnmaskedSet

    w = torch.nn.Parameter(torch.arange(6.0))
    s = UnmaskedSet({"w": w})
    s.replace("w", torch.tensor([1, 2]))
    with torch.no_grad():
        w[1], w[2] = 10.0, 20.0  # trained
    s.replace("w", torch.tensor([2, 3]))  # 1 leaves after moving, 2 stays
    with torch.no_grad():
        w[2], w[3] = 21.0, 30.0
    s.replace("w", torch.tensor([1, 4]))  # 1 re-joins: its base is 1.0, not its moved value 10.0
    assert len(s) == 2
    assert s.indices["w"].tolist() == [1, 4] and s.base_values["w"].tolist() == [1.0, 4.0]
    idx, base = s.trained_indices("w")
    assert idx.tolist() == [1, 2, 3, 4] and base.tolist() == [1.0, 2.0, 3.0, 4.0]
    # The union store survives a checkpoint.
    s2 = UnmaskedSet({"w": w})
    s2.load_state_dict(s.state_dict())
    assert [t.tolist() for t in s2.trained_indices("w")] == [idx.tolist(), base.tolist()]


def test_repeat_refuses_a_standard_optimizer():
    with pytest.raises(ValueError, match="sparse_adamw"):
        _mlp_engine("repeat", optimizer="trainer")


def test_static_chooses_once_on_the_first_gradients():
    model, engine = _mlp_engine("static", budget=15)
    engine.start(4)
    assert len(engine.unmasked) == 0
    fingerprints = []
    for x, y in _mlp_batches(n_batches=3):
        model(x, y)["loss"].backward()
        engine.step()
        model.zero_grad()
        fingerprints.append(engine.unmasked.fingerprint())
        assert len(engine.unmasked) == 15
    assert len(set(fingerprints)) == 1


def test_the_worked_example_is_a_complete_method():
    """docs/methods.md's example method, run from the page itself: one file's code, registered by name."""
    from id3_callback.methods.base import METHODS

    page = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    code = page.split("### Worked example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("from .base import", "from id3_callback.methods.base import")
    exec(compile(code, "docs/methods.md", "exec"), {"__name__": "gradient_magnitude"})
    try:
        assert "gradient-magnitude" in available_methods()
        sets = {}
        for low_memory in (False, True):
            model = tiny_bert()
            engine = ID3Engine(
                model, ID3Config(budget=60, method="gradient-magnitude", low_memory=low_memory)
            )
            assert engine.low_memory_active is False and engine.low_memory == low_memory
            engine.start(4)
            chosen = []
            for batch in token_batches("cls", 4):
                model(**batch).loss.backward()
                if not low_memory:  # the reference: |g| of every masked entry, brute-force top-k
                    grads = [p.grad.abs().reshape(-1).clone() for p in engine.unmasked.params.values()]
                    for g, idx in zip(grads, engine.unmasked.indices.values()):
                        g[idx] = float("-inf")
                    k = engine.schedule.target(engine.steps_done + 1) - len(engine.unmasked)
                    want = brute_force_topk(grads, k)
                before = {n: i.clone() for n, i in engine.unmasked.indices.items()}
                engine.step()
                new = torch.cat(
                    [
                        engine.plan.offsets[n] + i[before[n].numel() :]
                        for n, i in engine.unmasked.indices.items()
                    ]
                )
                chosen.append(torch.sort(new).values)
                if not low_memory:
                    assert torch.equal(chosen[-1], torch.sort(want).values)
                model.zero_grad()
            assert len(engine.unmasked) == 60 and engine.low_memory_active == low_memory
            sets[low_memory] = chosen
        assert all(torch.equal(a, b) for a, b in zip(sets[False], sets[True]))
    finally:
        METHODS.pop("gradient-magnitude", None)
