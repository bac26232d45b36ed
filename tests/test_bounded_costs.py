"""The bounded path's branch per layer (GEMM rows or the bound), measured in a run's first steps
(`id3_callback/bounded_costs.py`): the probe schedule, the threshold rule, the state that makes a resumed run
bitwise the uninterrupted one, and exact selection on every step, the probe steps included."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import (
    assert_added_top_k,
    dense_reference,
    tiny_bert,
    token_batches,
    token_data,
    training_args,
)

from id3_callback import ID3Config, ID3Engine, SparseAdamW, bounded_costs, selection
from id3_callback.bounded_costs import PROBES, UNMEASURED_TOKENS, BranchCosts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def measured(monkeypatch):
    """The default: no fixed threshold (conftest fixes one for the rest of the suite)."""
    monkeypatch.setattr(bounded_costs, "FIXED_TOKENS", None)
    monkeypatch.setattr(selection, "BOUNDED_MIN_ENTRIES", 0)  # every Linear of the tiny model is bounded


# ------------------------------------------------------------------------------------------ the rule
def test_probes_alternate_then_each_layer_gets_its_measured_threshold():
    costs = BranchCosts()
    seen = []
    for step in range(2 * PROBES):
        probe = costs.probe_branch()
        seen.append(probe)
        assert costs.branch("fc", 10**6, probe) == probe  # every layer takes the probe's branch
        if probe == "rows":  # fc: 1 us per live token (3 us when the machine was busy)
            costs.record("fc", "rows", 200, 200 * (1e-6 if step == 1 else 3e-6))
        else:  # fc: 150 us (90 us, then 60 us re-scored at certify), wide: rows never measured
            costs.record("fc", "bound", 200, 150e-6 if step == 0 else 90e-6)
            costs.add_rescoring("fc", 60e-6 if step else 0.0)
            costs.record("wide", "bound", 200, 1e-3)
        costs.end_step(probe)
    assert seen == ["bound", "rows"] * PROBES and costs.probe_branch() is None and not costs.measuring
    # the fastest readings: 150 us against 1 us per token, so GEMM rows up to 150 live tokens
    assert costs.rows_below == {"fc": pytest.approx(150.0)} and costs.readings == {}
    assert costs.branch("fc", 150, None) == "rows" and costs.branch("fc", 151, None) == "bound"
    # a layer without both readings keeps the fixed rule
    assert costs.branch("wide", UNMEASURED_TOKENS, None) == "rows"
    assert costs.branch("wide", UNMEASURED_TOKENS + 1, None) == "bound"
    assert "as measured on this machine: GEMM rows up to 150..150 live tokens" in costs.summary()


def test_steps_without_a_probe_do_not_count_and_a_fixed_threshold_measures_nothing(monkeypatch):
    costs = BranchCosts()
    costs.end_step(None)  # step 0 (no threshold guess yet) or a step that selects nothing
    assert costs.probes_done == 0 and costs.probe_branch() == "bound"
    fixed = BranchCosts(fixed=0)
    assert not fixed.measuring and fixed.probe_branch() is None
    assert fixed.branch("fc", 1, None) == "bound" and fixed.branch("fc", 0, None) == "rows"
    assert "at most 0 live tokens" in fixed.summary()
    monkeypatch.setattr(bounded_costs, "FIXED_TOKENS", 64)  # the process-wide one, under the config's
    assert BranchCosts().branch("fc", 64, "bound") == "rows" and BranchCosts(fixed=0).threshold == 0


@pytest.mark.parametrize("value", [-1, 2.5, True, "1024"])
def test_config_rejects_a_bad_threshold_and_says_what_is_allowed(value):
    with pytest.raises(ValueError, match="bounded_gemm_tokens must be None .measured. or an integer >= 0"):
        ID3Config(bounded_gemm_tokens=value)


def test_state_round_trip_inside_the_probe_steps_continues_the_schedule():
    costs = BranchCosts()
    costs.record("fc", "bound", 100, 1e-4)
    costs.end_step("bound")
    again = BranchCosts()
    again.load_state_dict(copy.deepcopy(costs.state_dict()))
    assert again.probes_done == 1 and again.probe_branch() == "rows" and again.readings == costs.readings
    again.load_state_dict(None)  # a state written before the costs were measured: nothing changes
    assert again.probes_done == 1


# ------------------------------------------------------------------------------------------ in the engine
def _engine(model, state=None, **config):
    """A started bounded engine for 8 steps; with `state`, loaded from it first (a resumed run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ID3Engine(model, ID3Config(budget=400, weight_grads="bounded", **config))
    if state is not None:
        engine.load_state_dict(state)
    engine.start(8)
    return engine


def _train(engine, model, batches, opt, check=None):
    for batch in batches:
        before = {n: i.numel() for n, i in engine.unmasked.indices.items()}
        k = engine.schedule.target(engine.steps_done + 1) - len(engine.unmasked)
        scores, dense_grads = dense_reference(model, engine, batch) if check else (None, None)
        model(**batch).loss.backward()
        engine.step()
        if check:
            assert len(assert_added_top_k(engine, before, k, scores)) == k
            for name in engine.bounded.layers:
                want = dense_grads[name][engine.unmasked.indices[name]]
                torch.testing.assert_close(engine.unmasked.grad_stash[name], want, rtol=1e-4, atol=1e-6)
            check(engine)
        opt.step()
        opt.zero_grad()


def _gemm_rows_shares(engine, model, opt, steps):
    """Train `steps` steps, each checked against the dense path; each step's share of entries by GEMM rows."""
    shares = []
    _train(
        engine,
        model,
        token_batches("cls", steps=steps),
        opt,
        lambda e: shares.append(e.bounded.last_step["dense"]),
    )
    return shares


def test_probe_steps_and_measured_choices_select_the_dense_top_k_and_resume_bitwise():
    model = tiny_bert().eval()
    engine = _engine(model)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    assert "by their times on this machine over the first 4 scoring steps" in engine.summary()
    shares = _gemm_rows_shares(engine, model, opt, steps=5)
    # step 0 has no threshold guess (every entry from GEMM rows); then bound, rows, bound, rows
    assert shares[0] == 1.0 and shares[2] == shares[4] == 1.0 and shares[1] < 1.0 and shares[3] < 1.0
    costs = engine.branch_costs
    assert not costs.measuring and set(costs.rows_below) == set(engine.bounded.layers)
    assert "as measured on this machine" in engine.summary()

    # force a mix, half the layers each way: the step's GEMM-rows share is those layers' share of entries
    names = sorted(engine.bounded.layers)
    costs.rows_below = {n: (1e9 if i % 2 else 0.0) for i, n in enumerate(names)}
    sizes = {n: engine.unmasked.params[n].numel() for n in names}
    rows_share = sum(sizes[n] for i, n in enumerate(names) if i % 2) / sum(sizes.values())
    saved = copy.deepcopy((model.state_dict(), engine.state_dict(), opt.state_dict()))
    batches = list(token_batches("cls", steps=8))[5:]

    def mixed(e):
        assert e.bounded.last_step["dense"] == pytest.approx(rows_share)

    _train(engine, model, batches, opt, mixed)

    resumed_model = tiny_bert().eval()
    resumed_model.load_state_dict(saved[0])
    resumed = _engine(resumed_model, state=saved[1])
    assert resumed.branch_costs.rows_below == costs.rows_below and not resumed.branch_costs.measuring
    resumed_opt = SparseAdamW(resumed.parameters(), resumed.unmasked, lr=1e-2)
    resumed_opt.load_state_dict(saved[2])
    _train(resumed, resumed_model, batches, resumed_opt)
    assert resumed.unmasked.fingerprint() == engine.unmasked.fingerprint()
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name


def test_a_configured_threshold_is_honoured_and_nothing_is_measured():
    model = tiny_bert().eval()
    engine = _engine(model, bounded_gemm_tokens=0)  # every layer by the bound, from the first guess on
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    shares = _gemm_rows_shares(engine, model, opt, steps=4)
    assert all(share < 1.0 for share in shares[1:])
    assert engine.branch_costs.probes_done == 0 and engine.branch_costs.rows_below == {}
    assert "at most 0 live tokens" in engine.summary()


# ------------------------------------------------------------------------------------------ through the Trainer
def _trainer_run(tmp_path, out, resume=None):
    from transformers import TrainerCallback

    from id3_callback import ID3Callback, ID3Trainer
    from id3_callback.logging import MaskHeatmapCallback

    class SaveAtStep6(TrainerCallback):  # after step 1 (no guess) and the four probe steps
        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = state.global_step == 6

    model = tiny_bert()
    args = training_args(
        tmp_path,
        output_dir=str(tmp_path / out),
        per_device_train_batch_size=4,
        max_steps=8,
        max_grad_norm=1.0,
        save_strategy="no",
    )
    trainer = ID3Trainer(
        model=model,
        args=args,
        train_dataset=token_data(n=32, seq=8, kind="cls"),
        callbacks=[ID3Callback(ID3Config(budget=80, weight_grads="bounded")), SaveAtStep6()],
    )
    trainer.remove_callback(MaskHeatmapCallback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def test_trainer_checkpoint_carries_the_measured_choices_and_resumes_bitwise(tmp_path):
    trainer, model = _trainer_run(tmp_path, "out")
    costs = trainer.engine.branch_costs
    assert costs.probes_done == 2 * PROBES and set(costs.rows_below) == set(
        trainer.engine.plan.bounded_layers
    )
    resumed, model2 = _trainer_run(tmp_path, "resumed", resume=str(tmp_path / "out" / "checkpoint-6"))
    assert resumed.engine.branch_costs.rows_below == costs.rows_below
    assert resumed.engine.unmasked.fingerprint() == trainer.engine.unmasked.fingerprint()
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name
