"""The engine on its own: config, schedules, exact selection, the unmasked set, SparseAdamW."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import MLP, brute_force_topk, global_topk, split_by_tensor
from torch import nn

from id3_callback import ID3Config, ID3Engine, Schedule, SparseAdamW, d3_scores
from id3_callback import selection as sel
from id3_callback.schedulers import SCHEDULERS

# ----------------------------------------------------------------------------------------------- config


def test_budget_fraction_and_count():
    assert ID3Config(budget=0.01).resolve_budget(1000) == 10
    assert ID3Config(budget=7).resolve_budget(1000) == 7
    assert ID3Config(budget=1e-9).resolve_budget(1000) == 1  # never rounds to zero


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(budget=0), "budget must be > 0"),
        (dict(budget=-3), "budget must be > 0"),
        (dict(budget=2.5), "neither a count nor a fraction"),
        (dict(eps=-1.0), "eps and exp must be >= 0"),
        (dict(eps=0.0, exp=1.0), "use eps > 0"),
        (dict(optimizer="adam"), "sparse_adamw"),
    ],
)
def test_config_rejects_bad_values_with_the_fix(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ID3Config(**kwargs)


def test_budget_above_selectable_warns_and_unmasks_all():
    with pytest.warns(UserWarning, match="exceeds the 10 selectable entries"):
        assert ID3Config(budget=50).resolve_budget(10) == 10


def test_config_parses_beside_training_arguments(tmp_path):
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((ID3Config, TrainingArguments))
    id3, args = parser.parse_args_into_dataclasses(
        ["--budget", "1000", "--exp", "0", "--output_dir", str(tmp_path), "--seed", "3"]
    )
    assert id3.budget == 1000 and id3.exp == 0 and args.seed == 3


# -------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("budget, steps", [(1, 1), (3, 10), (10, 3), (97, 10), (1000, 7), (5, 5), (0, 4)])
def test_schedules_sum_to_budget_exactly(name, budget, steps):
    s = Schedule(name, budget, steps)
    assert sum(s.counts) == budget and len(s.counts) == steps and min(s.counts) >= 0
    assert [s.target(t) for t in range(steps + 3)][-1] == budget
    targets = [s.target(t) for t in range(steps + 1)]
    assert targets == sorted(targets)  # cumulative, never shrinks


def test_uniform_is_the_papers_floor_plus_remainder_first():
    assert Schedule("uniform", 10, 4).counts == [3, 3, 2, 2]
    assert Schedule("uniform", 3, 5).counts == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("name", ["linear", "exponential", "front_loaded"])
def test_front_loaded_schedules_are_non_increasing(name):
    counts = Schedule(name, 10_000, 40).counts
    assert counts[0] > counts[-1]
    assert all(a >= b for a, b in zip(counts, counts[1:]))


@pytest.mark.parametrize("steps", [1, 3, 4, 99, 600])
def test_front_loaded_spends_the_budget_in_the_first_quarter(steps):
    s = Schedule("front_loaded", 1_000, steps)
    quarter = -(-steps // 4)
    assert s.target(quarter) == 1_000 and sum(s.counts) == 1_000
    assert quarter == steps or s.target(quarter - 1) < 1_000


def test_unknown_scheduler_is_named():
    with pytest.raises(ValueError, match="uniform"):
        Schedule("cosine", 10, 10)


# ---------------------------------------------------------------------------------------------- selection


def brute_force(tensors, k):
    """The reference, split per tensor."""
    return split_by_tensor(brute_force_topk(tensors, k), [t.numel() for t in tensors])


@pytest.mark.parametrize("seed", range(12))
def test_global_topk_equals_brute_force_with_ties_and_nans(seed, monkeypatch):
    g = torch.Generator().manual_seed(seed)
    if seed % 2:
        monkeypatch.setattr(sel, "CHUNK", 7)  # exercise chunking and tie searches across chunks
    tensors = []
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        n = int(torch.randint(1, 40, (1,), generator=g))
        # few distinct values -> many ties, including at the top-k boundary
        t = torch.randint(0, 4, (n,), generator=g).float()
        t[torch.rand(n, generator=g) < 0.15] = float("nan")
        t[torch.rand(n, generator=g) < 0.05] = float("inf")
        t[torch.rand(n, generator=g) < 0.1] = float("-inf")
        tensors.append(t)
    total = sum(t.numel() for t in tensors)
    for k in {1, 2, 5, total // 2, total, total + 3}:
        got = global_topk(tensors, k)
        want = brute_force(tensors, k)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (seed, k)


def test_selection_never_picks_nan_or_inf_even_when_short():
    t = torch.tensor([float("nan"), float("inf"), 1.0, float("-inf")])
    assert global_topk([t], 4)[0].tolist() == [2]


def test_streaming_topk_memory_is_bounded_by_k():
    top = sel.StreamingTopK(5)
    for seed in range(20):
        top.push(torch.rand(1000, generator=torch.Generator().manual_seed(seed)))
        assert top.values.numel() <= 5
    assert top.offset == 20_000


# ------------------------------------------------------------------------------------------------- engine


def run_engine(model, budget, steps, extra_steps=0, **config):
    engine = ID3Engine(model, ID3Config(budget=budget, **config))
    engine.start(steps)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    sizes = []
    g = torch.Generator().manual_seed(0)
    for _ in range(steps + extra_steps):
        x = torch.randn(16, 8, generator=g)
        model(x, labels=torch.randint(0, 3, (16,), generator=g))["loss"].backward()
        engine.step()
        sizes.append(len(engine.unmasked))
        opt.step()
        opt.zero_grad()
    return engine, sizes


@pytest.mark.parametrize("budget, steps", [(3, 10), (10, 10), (17, 4), (100, 7), (195, 3), (1000, 5)])
def test_unmasked_set_grows_to_exactly_the_budget(budget, steps):
    model = MLP()
    selectable = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, sizes = run_engine(model, budget, steps, extra_steps=2)
    expected = min(budget, selectable)
    assert sizes == sorted(sizes) and max(sizes) <= expected  # only grows, never past B
    assert sizes[steps - 1] == expected and sizes[-1] == expected
    assert sizes == [engine.schedule.target(t + 1) for t in range(steps + 2)]
    for idx in engine.unmasked.indices.values():  # no duplicates
        assert idx.unique().numel() == idx.numel()


def test_update_count_is_half_a_static_mask():
    budget, steps = 60, 12
    engine, sizes = run_engine(MLP(), budget, steps)
    assert engine.updates_total == sum(sizes) == budget * (steps + 1) // 2
    assert engine.log_metrics()["id3/updates_vs_static"] == pytest.approx((steps + 1) / (2 * steps))


def test_engine_picks_the_brute_force_d3_top_k():
    model = MLP()
    engine = ID3Engine(model, ID3Config(budget=12, eps=1e-2, exp=2.0))
    engine.start(3)
    model(torch.randn(16, 8), labels=torch.randint(0, 3, (16,)))["loss"].backward()
    scores = [d3_scores(p.grad, p.detach(), 1e-2, 2.0) for p in model.parameters()]
    want = brute_force(scores, 4)
    engine.step()
    got = [engine.unmasked.sorted_indices(n)[0] for n in engine.unmasked.params]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_masked_gradients_are_zero_and_empty_tensors_drop_their_grad():
    model = MLP()
    engine = ID3Engine(model, ID3Config(budget=3))
    engine.start(1)
    model(torch.randn(4, 8), labels=torch.randint(0, 3, (4,)))["loss"].backward()
    engine.step()
    nonzero = 0
    for name, p in engine.unmasked.params.items():
        idx = engine.unmasked.indices[name]
        if idx.numel() == 0:
            assert p.grad is None
        else:
            mask = torch.ones(p.numel(), dtype=torch.bool)
            mask[idx] = False
            assert (p.grad.view(-1)[mask] == 0).all()
            nonzero += int((p.grad.view(-1)[idx] != 0).sum())
    assert nonzero == 3


def test_scaled_gradients_select_the_same_entries_and_overflow_grows_nothing():
    torch.manual_seed(0)
    a, b = MLP(), MLP()
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    ea, eb = ID3Engine(a, ID3Config(budget=10)), ID3Engine(b, ID3Config(budget=10))
    ea.start(2), eb.start(2)
    a(x, labels=y)["loss"].backward()
    (b(x, labels=y)["loss"] * 1024.0).backward()
    ea.step()
    eb.step(grad_scale=1024.0, check_overflow=True)
    assert ea.unmasked.fingerprint() == eb.unmasked.fingerprint()
    b.zero_grad()
    (b(x, labels=y)["loss"] * float("inf")).backward()  # overflow: the optimizer would skip this step
    stats = eb.step(grad_scale=1024.0, check_overflow=True)
    assert stats["new"] == 0 and stats["skipped"] and len(eb.unmasked) == 5
    b.zero_grad()
    b(x, labels=y)["loss"].backward()
    eb.step(grad_scale=1.0, check_overflow=True)
    assert len(eb.unmasked) == 10  # the shortfall carries over


def test_fp16_grad_scaler_loop_on_cpu():
    """A real GradScaler: scaled gradients, scores on the unscaled values, overflow steps skipped."""
    model = MLP()
    engine = ID3Engine(model, ID3Config(budget=20))
    engine.start(4)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(4):
        loss = model(torch.randn(8, 8), labels=torch.randint(0, 3, (8,)))["loss"]
        if step == 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        engine.step(grad_scale=scaler.get_scale(), check_overflow=True)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert engine.skipped_steps == 1 and len(engine.unmasked) == 20
    for name, p in model.named_parameters():
        mask = torch.ones(p.numel(), dtype=torch.bool)
        mask[engine.unmasked.indices[name]] = False
        assert torch.equal(p.detach().view(-1)[mask], before[name].view(-1)[mask])


@pytest.mark.parametrize(
    "config, needle",
    [
        (dict(include="nothing-matches"), "leave no selectable parameter"),
        (dict(exclude="."), "leave no selectable parameter"),
        (dict(include="("), "not a valid regex"),
        (dict(dense="nothing-matches"), "matches no trainable parameter"),
    ],
)
def test_engine_errors_name_the_fix(config, needle):
    with pytest.raises(ValueError, match=needle):
        ID3Engine(MLP(), ID3Config(**config))


def test_no_trainable_parameters():
    model = MLP().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        ID3Engine(model, ID3Config())


def test_unknown_total_steps():
    engine = ID3Engine(MLP(), ID3Config(budget=5))
    with pytest.raises(ValueError, match="max_steps"):
        engine.start(0)
    with pytest.raises(RuntimeError, match="start"):
        engine.step()


def test_dense_tensors_train_fully_outside_or_inside_the_budget():
    model = MLP()
    outside = ID3Engine(model, ID3Config(budget=20, dense=r"net\.2\."))
    assert outside.budget == 20 and outside.dense_entries == 16 * 3 + 3
    inside = ID3Engine(model, ID3Config(budget=60, dense=r"net\.2\.", dense_in_budget=True))
    assert inside.budget == 60 - 51
    assert "dense: 2 tensors" in inside.summary()


# -------------------------------------------------------------------------------------------- SparseAdamW


def test_sparse_adamw_state_is_o_of_b():
    model = nn.Linear(100, 100)
    engine = ID3Engine(model, ID3Config(budget=50))
    engine.start(5)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-3)
    for _ in range(5):
        model(torch.randn(4, 100)).sum().backward()
        engine.step()
        opt.step()
        opt.zero_grad()
    assert opt.state_bytes() == 50 * (4 + 4 + 4)  # exp_avg, exp_avg_sq (fp32) + per-entry step


def test_late_unmasked_entry_takes_a_fresh_adam_step():
    """An entry joining at step 4 moves exactly as a fresh torch AdamW would on the same gradients."""
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    engine = ID3Engine(nn.ParameterList([w]), ID3Config(budget=4))
    engine.unmasked.add("0", torch.tensor([0, 1, 2]))
    engine.start(10)
    opt = SparseAdamW([w], engine.unmasked, lr=0.1, weight_decay=0.05)
    fresh = nn.Parameter(torch.tensor([3.0]))
    ref = torch.optim.AdamW([fresh], lr=0.1, weight_decay=0.05)
    grads = [torch.tensor([0.3, -0.1, 0.2, g]) for g in (0.5, -0.25, 2.0, 0.7, -1.5, 0.1, 0.9)]
    for step, grad in enumerate(grads):
        if step == 3:
            engine.unmasked.add("0", torch.tensor([3]))
        w.grad = grad.clone()
        engine.unmasked.mask_gradients()
        opt.step()
        if step >= 3:
            fresh.grad = grad[3:].clone()
            ref.step()
    assert torch.allclose(w.detach()[3:], fresh.detach(), rtol=0, atol=1e-6)


def test_sparse_adamw_matches_torch_adamw_on_a_fully_unmasked_tensor():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(6, 5))
    b = nn.Parameter(a.detach().clone())
    engine = ID3Engine(nn.ParameterList([a]), ID3Config(budget=30))
    engine.unmasked.add("0", torch.randperm(30))
    opt = SparseAdamW([a], engine.unmasked, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(6, 5)
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.allclose(a, b, rtol=0, atol=1e-6)
