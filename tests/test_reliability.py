"""Fault injection through the public API: damaged or stale checkpoint state, settings changed on resume,
the user's optimizer choice, whole-tensor deltas on a fresh base, a callback shared by two trainers,
config validation, budget shortfalls, and damaged or concurrently replaced delta files."""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import threading

import pytest
import torch
from helpers import MLP, changed_entries, mlp_data, snapshot, tiny_bert, token_data, training_args

from id3_callback import (
    DeltaError,
    ID3Callback,
    ID3Config,
    ID3Engine,
    ID3Trainer,
    SparseAdamW,
    apply_delta,
    load_delta,
    remove_delta,
    save_delta,
)
from id3_callback import state as state_io
from id3_callback.optim import choose_optimizer
from id3_callback.state import StateError

SAVE = dict(max_steps=6, save_strategy="steps", save_steps=2)


def make(tmp_path, config=None, model=None, data=None, **args):
    return ID3Trainer(
        model=model or MLP(),
        args=training_args(tmp_path, **(SAVE | args)),
        train_dataset=data or mlp_data(),
        callbacks=[ID3Callback(config or ID3Config(budget=40))],
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    make(folder).train()
    return folder / "out"


@pytest.fixture
def run(tmp_path, finished):
    """A finished run with checkpoint-2, -4 and -6 in tmp_path/out (a copy each test may damage)."""
    shutil.copytree(finished, tmp_path / "out")
    return tmp_path


# ----------------------------------------------------------------------------------- 2. state integrity
def _rewrite(path, edit):
    """Re-encode a state with `edit(state)` applied, with a valid checksum: only the content check can fire."""
    state = state_io.read_state(path)
    edit(state)
    path.write_bytes(state_io.encode(state))


def _duplicate(state):
    ix, base = state["unmasked"]["indices"], state["unmasked"]["base_values"]
    name = next(n for n, i in ix.items() if i.numel())
    ix[name], base[name] = torch.cat([ix[name], ix[name][:1]]), torch.cat([base[name], base[name][:1]])


def _out_of_range(state):
    ix = state["unmasked"]["indices"]
    name = next(n for n, i in ix.items() if i.numel())
    ix[name] = ix[name].clone()
    ix[name][0] = 10**6


def _over_budget(state):
    ix, base = state["unmasked"]["indices"], state["unmasked"]["base_values"]
    free = torch.tensor(sorted(set(range(128)) - set(ix["net.0.weight"].tolist()))[:30])
    ix["net.0.weight"] = torch.cat([ix["net.0.weight"], free])
    base["net.0.weight"] = torch.cat([base["net.0.weight"], torch.zeros(30)])


def _flip(data: bytes) -> bytes:
    data = bytearray(data)
    data[-50] ^= 0x01
    return bytes(data)


DAMAGE = [
    ("flipped byte", lambda p, out: p.write_bytes(_flip(p.read_bytes())), "checksum mismatch"),
    ("truncated", lambda p, out: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "checksum mismatch"),
    ("truncated header", lambda p, out: p.write_bytes(p.read_bytes()[:20]), "truncated header"),
    ("empty", lambda p, out: p.write_bytes(b""), "not an ID3 state file, 0 bytes"),
    (
        "copied from another step",
        lambda p, out: shutil.copy(out / "checkpoint-2" / "id3_state.pt", p),
        "state of step 2, but the checkpoint's trainer_state.json is at step 4",
    ),
    ("duplicate indices", lambda p, out: _rewrite(p, _duplicate), "duplicate indices"),
    ("index out of range", lambda p, out: _rewrite(p, _out_of_range), "index out of range"),
    ("over the budget", lambda p, out: _rewrite(p, _over_budget), "above the budget 40"),
]


@pytest.mark.parametrize("damage, needle", [(d, n) for _, d, n in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_state_is_refused_before_anything_loads(run, damage, needle):
    out = run / "out"
    path = out / "checkpoint-4" / "id3_state.pt"
    damage(path, out)
    model = MLP()
    before = snapshot(model)
    trainer = make(run, model=model)
    with pytest.raises(StateError, match=re.escape(str(path)) + ".*" + re.escape(needle)):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert len(trainer.engine.unmasked) == 0 and trainer.engine.steps_done == 0
    assert not any(i.numel() for i in changed_entries(before, model).values())  # weights not loaded either


def test_a_stale_state_from_an_earlier_run_in_the_same_output_dir_is_refused(run, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    make(other, ID3Config(budget=40, eps=1e-2)).train()
    shutil.copy(
        other / "out" / "checkpoint-4" / "id3_state.pt", run / "out" / "checkpoint-4" / "id3_state.pt"
    )
    with pytest.raises(StateError, match=r"other settings \(eps: checkpoint 0.01, this run 0.001\)"):
        make(run).train(resume_from_checkpoint=str(run / "out" / "checkpoint-4"))


def test_a_rerun_into_an_old_output_dir_never_leaves_a_folder_that_looks_complete(run, monkeypatch):
    """A save that dies in the model write, over a folder an earlier run completed, reads as incomplete."""
    from transformers import Trainer

    real, calls = Trainer.save_model, []

    def dies_at_step_4(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save_model", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        make(run).train()
    assert state_io.incomplete_reason(run / "out" / "checkpoint-4") == "no trainer_state.json"
    assert state_io.incomplete_reason(run / "out" / "checkpoint-2") is None


CHANGED = [
    ("scheduler", dict(config=ID3Config(budget=40, scheduler="linear")), "scheduler: checkpoint 'uniform'"),
    ("eps", dict(config=ID3Config(budget=40, eps=1e-2)), "eps: checkpoint 0.001, this run 0.01"),
    ("exp", dict(config=ID3Config(budget=40, exp=2.0)), "exp: checkpoint 1.0, this run 2.0"),
    ("max_steps", dict(max_steps=8), "total_steps: checkpoint 6, this run 8"),
    (
        "include",
        dict(config=ID3Config(budget=40, include=r"net\.0")),
        "include: checkpoint None, this run 'net",
    ),
    ("budget", dict(config=ID3Config(budget=30)), "budget: checkpoint 40, this run 30"),
    ("model", dict(hidden=12), "the selectable or dense tensors (names, shapes or dtypes)"),
    (
        "method",
        dict(config=ID3Config(budget=40, method="static")),
        "method: checkpoint 'id3', this run 'static'",
    ),
    (
        "optimizer",
        dict(config=ID3Config(budget=40, optimizer="trainer")),
        "optimizer: checkpoint 'sparse_adamw'",
    ),
]


@pytest.mark.parametrize("changes, needle", [(c, n) for _, c, n in CHANGED], ids=[c[0] for c in CHANGED])
def test_resume_with_other_settings_is_refused_before_the_optimizer_loads(run, monkeypatch, changes, needle):
    from transformers import Trainer

    loads = []
    monkeypatch.setattr(Trainer, "_load_optimizer_and_scheduler", lambda self, c: loads.append(c))
    if "hidden" in changes:  # a model of another shape, built here rather than at import
        changes = dict(changes, model=MLP(hidden=changes["hidden"]))
        del changes["hidden"]
    trainer = make(run, **changes)
    with pytest.raises(StateError, match=re.escape(needle)):
        trainer.train(resume_from_checkpoint=str(run / "out" / "checkpoint-4"))
    assert loads == []


def test_resume_with_another_epoch_count_is_refused_at_train_begin(run):
    """With max_steps unset T is known only inside the Trainer's loop: the engine refuses it at train begin."""
    trainer = make(run, max_steps=-1, num_train_epochs=1)  # 64 rows / batch 8 = 8 steps, not 6
    with pytest.raises(StateError, match="run of 6 optimizer steps, this run has 8"):
        trainer.train(resume_from_checkpoint=str(run / "out" / "checkpoint-4"))


def test_missing_state_names_the_previous_complete_checkpoint(run):
    out = run / "out"
    os.remove(out / "checkpoint-4" / "id3_state.pt")
    with pytest.raises(
        StateError, match=r"checkpoint-4 is an incomplete checkpoint \(interrupted save\?\).*checkpoint-2"
    ):
        make(run).train(resume_from_checkpoint=str(out / "checkpoint-4"))
    os.remove(out / "checkpoint-2" / "id3_state.pt")
    with pytest.raises(StateError, match="No complete checkpoint precedes it"):
        make(run).train(resume_from_checkpoint=str(out / "checkpoint-4"))


def test_resume_true_skips_an_incomplete_newest_checkpoint_with_a_warning(run):
    out = run / "out"
    os.remove(out / "checkpoint-6" / "trainer_state.json")
    trainer = make(run)
    with pytest.warns(
        UserWarning, match=r"resuming from .*checkpoint-4.*checkpoint-6: no trainer_state.json"
    ):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.engine.steps_done == 6 and len(trainer.engine.unmasked) == 40


def test_engine_load_outside_the_trainer_verifies_too(run):
    path = run / "out" / "checkpoint-4" / "id3_state.pt"
    path.write_bytes(_flip(path.read_bytes()))
    engine = ID3Engine(MLP(), ID3Config(budget=40))
    with pytest.raises(StateError, match="checksum mismatch"):
        engine.load(path.parent)
    assert len(engine.unmasked) == 0
    engine.load(run / "out" / "checkpoint-6", global_step=6)
    assert len(engine.unmasked) == 40
    with pytest.raises(StateError, match="run of 6 optimizer steps, this run has 9"):
        engine.start(total_steps=9)


def test_legacy_state_without_checksum_still_loads(run):
    """Format 1 (a plain torch.save, no checksum or fingerprint) loads with the checks it allows."""
    path = run / "out" / "checkpoint-6" / "id3_state.pt"
    state = state_io.read_state(path)
    legacy = {k: v for k, v in state.items() if k not in ("global_step", "fingerprint")}
    legacy["format"] = state_io.LEGACY_FORMAT
    buffer = io.BytesIO()
    torch.save(legacy, buffer)
    path.write_bytes(buffer.getvalue())
    engine = ID3Engine(MLP(), ID3Config(budget=40))
    engine.load(path.parent)
    assert len(engine.unmasked) == 40
    with pytest.raises(StateError, match="other settings"):
        ID3Engine(MLP(), ID3Config(budget=30)).load(path.parent)


# ------------------------------------------------------------------------------------- 3. the optimizer
DEFAULT = "adamw_torch_fused"


def _other_adamw() -> str:
    """An AdamW `optim` that is not this transformers version's default (4.x: adamw_torch, 5.x: fused)."""
    from transformers import TrainingArguments

    default = str(TrainingArguments.__dataclass_fields__["optim"].default)
    return "adamw_torch_fused" if default == "adamw_torch" else "adamw_torch"


@pytest.mark.parametrize(
    "choice, optim, given, kind, says",
    [
        ("auto", DEFAULT, False, "sparse_adamw", "auto: TrainingArguments.optim is the Trainer's default"),
        ("auto", "sgd", False, "trainer", "TrainingArguments.optim='sgd' (auto: the user's choice)"),
        ("auto", DEFAULT, True, "trainer", "the optimizer passed to the Trainer"),
        ("sparse_adamw", "sgd", False, "sparse_adamw", "TrainingArguments.optim='sgd' is not used"),
        ("trainer", DEFAULT, False, "trainer", "ID3Config(optimizer='trainer')"),
    ],
)
def test_choose_optimizer(choice, optim, given, kind, says):
    got, why = choose_optimizer(choice, optim, DEFAULT, given)
    assert got == kind and says in why


def test_forcing_sparse_adamw_beside_a_given_optimizer_is_refused():
    with pytest.raises(ValueError, match="conflicts with the optimizer passed"):
        choose_optimizer("sparse_adamw", DEFAULT, DEFAULT, given=True)


@pytest.mark.parametrize(
    "optimizer, optim, expected",
    [
        ("auto", None, SparseAdamW),
        ("auto", "sgd", torch.optim.SGD),
        ("auto", _other_adamw(), torch.optim.AdamW),
        ("sparse_adamw", "sgd", SparseAdamW),
        ("trainer", None, torch.optim.AdamW),
    ],
)
def test_the_users_optimizer_is_honoured(tmp_path, capsys, optimizer, optim, expected):
    model = MLP()
    before = snapshot(model)
    args = dict(save_strategy="no", weight_decay=0.1) | ({"optim": optim} if optim else {})
    trainer = make(tmp_path, ID3Config(budget=40, optimizer=optimizer), model=model, **args)
    trainer.train()
    assert type(trainer.optimizer.optimizer) is expected
    line = next(x for x in capsys.readouterr().out.splitlines() if "optimizer:" in x)
    assert ("SparseAdamW" in line) == (expected is SparseAdamW), line
    if optim:
        assert repr(optim) in line
    moved = changed_entries(before, model)
    for name, idx in moved.items():
        allowed = trainer.engine.unmasked.indices[name] if name in trainer.engine.unmasked.params else []
        assert set(idx.tolist()) <= set(torch.as_tensor(allowed).tolist()), f"{name}: masked entries moved"


def test_an_optimizer_passed_to_the_trainer_is_used(tmp_path):
    model = MLP()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    trainer = ID3Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=mlp_data(),
        callbacks=[ID3Callback(ID3Config(budget=40))],
        optimizers=(sgd, None),
    )
    before = snapshot(model)
    trainer.train()
    assert trainer.optimizer.optimizer is sgd
    assert sum(i.numel() for i in changed_entries(before, model).values()) <= 40
    with pytest.raises(ValueError, match="conflicts with the optimizer passed"):
        ID3Trainer(
            model=MLP(),
            args=training_args(tmp_path),
            train_dataset=mlp_data(),
            callbacks=[ID3Callback(ID3Config(budget=40, optimizer="sparse_adamw"))],
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )


# ------------------------------------------------------------------------------ 4. whole tensors in deltas
def test_a_delta_with_a_new_head_applies_to_a_fresh_base_with_another_random_head(tmp_path):
    model = tiny_bert()
    trainer = make(tmp_path, ID3Config(budget=200, dense="classifier"), model=model, data=token_data())
    trainer.train()
    path = save_delta(trainer, tmp_path / "d.safetensors")
    fresh = tiny_bert()  # the same base; the head re-initialised, as from_pretrained(base, num_labels=2) does
    torch.manual_seed(123)
    fresh.classifier.reset_parameters()
    before = snapshot(fresh)
    assert not torch.equal(fresh.classifier.weight, before["classifier.weight"] * 0 + model.classifier.weight)
    apply_delta(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    remove_delta(fresh)
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())


def test_sparse_base_mismatch_names_check_base(tmp_path):
    trainer = make(tmp_path, ID3Config(budget=40), save_strategy="no")
    trainer.train()
    path = save_delta(trainer, tmp_path / "d.safetensors")
    with pytest.raises(DeltaError, match=r"checksum mismatch.*check_base=False"):
        apply_delta(MLP(seed=1), path)


def test_format_1_deltas_still_apply(tmp_path):
    """A format 1 file (whole tensors with a base checksum, payload over tensors only) loads and applies."""
    from safetensors.torch import save_file

    from id3_callback.delta import _payload_sha, _read
    from id3_callback.io import _sha

    model = MLP()
    base = snapshot(model)
    trainer = make(tmp_path, ID3Config(budget=20, dense=r"net\.2\.bias"), model=model, save_strategy="no")
    trainer.train()
    meta, tensors = _read(str(save_delta(trainer, tmp_path / "d.safetensors")))
    meta["format"] = "id3-delta/1"
    meta["base_sha256"] = meta["base_sha256"][:-1] + f', "net.2.bias": "{_sha(base["net.2.bias"])}"}}'
    meta["payload_sha256"] = _payload_sha(tensors, meta)
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=meta)
    fresh = MLP()
    apply_delta(fresh, tmp_path / "v1.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


# ----------------------------------------------------------------------------------- 5. one engine per trainer
def test_one_callback_cannot_serve_two_trainers(tmp_path):
    callback = ID3Callback(ID3Config(budget=40))
    first = ID3Trainer(
        model=MLP(), args=training_args(tmp_path), train_dataset=mlp_data(), callbacks=[callback]
    )
    with pytest.raises(ValueError, match="already serves another trainer"):
        ID3Trainer(model=MLP(), args=training_args(tmp_path), train_dataset=mlp_data(), callbacks=[callback])
    assert first.engine.model is first.model  # the first trainer's engine was left alone
    first.train()
    assert load_delta(save_delta(first, tmp_path / "d.safetensors")).num_entries == 40


@pytest.mark.parametrize("callback", [ID3Callback(), ID3Callback], ids=["instance", "class"])
def test_add_callback_after_construction_says_what_to_do(tmp_path, callback):
    trainer = make(tmp_path)
    with pytest.raises(
        ValueError, match=r"pass callbacks=\[ID3Callback\(ID3Config\(\.\.\.\)\)\] to ID3Trainer"
    ):
        trainer.add_callback(callback)


# --------------------------------------------------------------------------------------------- 6. validation
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(eps=math.nan), "must be >= 0 and finite numbers \\(got eps=nan"),
        (dict(exp=math.nan), "must be >= 0 and finite numbers \\(got exp=nan"),
        (dict(exp=math.inf), "must be >= 0 and finite numbers \\(got exp=inf"),
        (dict(eps=math.inf), "must be >= 0 and finite numbers \\(got eps=inf"),
        (dict(exp=150.0), "outside the supported"),
        (dict(exp=13.0), "underflows float32"),
        (dict(budget=True), "budget must be a number"),
        (dict(budget="100"), "budget must be a number"),
        (dict(optimizer="adam"), "optimizer must be one of"),
    ],
)
def test_invalid_config_is_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ID3Config(**kwargs)


def test_large_but_representable_exp_trains():
    model = MLP()
    engine = ID3Engine(model, ID3Config(budget=10, eps=0.5, exp=16.0))
    engine.start(total_steps=1)
    model(torch.randn(8, 8))["logits"].pow(2).sum().backward()
    assert engine.step()["unmasked"] == 10


class NaNAtLastStep(MLP):
    """Its loss turns NaN on the last training step, so no score of that step is finite."""

    def __init__(self, last: int) -> None:
        super().__init__()
        self.calls, self.last = 0, last

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        self.calls += self.training
        if self.training and self.calls == self.last:
            out["loss"] = out["loss"] * math.nan
        return out


def test_a_budget_not_met_at_train_end_warns_and_counts_the_step(tmp_path):
    trainer = make(tmp_path, ID3Config(budget=60), model=NaNAtLastStep(last=6), save_strategy="no")
    with pytest.warns(UserWarning, match=r"ended with 50 of its budget of 60 .* 1 steps grew nothing"):
        trainer.train()
    assert trainer.engine.skipped_steps == 1 and len(trainer.engine.unmasked) == 50


# ------------------------------------------------------------------------------------------- 7. delta files
@pytest.fixture(scope="module")
def delta_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("delta")
    trainer = make(folder, ID3Config(budget=40, dense=r"net\.2\.bias"), save_strategy="no")
    trainer.train()
    return save_delta(trainer, folder / "d.safetensors")


def _resave(path, out, edit_tensors=None, edit_meta=None):
    from safetensors.torch import save_file

    from id3_callback.delta import _payload_sha, _read

    meta, tensors = _read(str(path))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    meta["payload_sha256"] = _payload_sha(tensors, meta)  # re-signed: only the targeted check can fire
    save_file(tensors, str(out), metadata=meta)
    return out


def _first(tensors, suffix):
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def _negative(t):
    key = _first(t, "::indices")
    t[key] = t[key].clone()
    t[key][0] = -3


BAD = [
    ("no values", lambda t: t.pop(_first(t, "::values")), None, r"has .*::indices; a delta holds either"),
    ("no indices", lambda t: t.pop(_first(t, "::indices")), None, r"has .*::values; a delta holds either"),
    (
        "base_sha256 not JSON",
        None,
        lambda m: m.update(base_sha256="{not json"),
        "base_sha256 is not valid JSON",
    ),
    ("base_sha256 not a mapping", None, lambda m: m.update(base_sha256="[1]"), "not a mapping"),
    ("negative index", _negative, None, "index -3 out of range"),
    ("metadata edited", None, lambda m: m.update(eps="0.5"), None),
]


@pytest.mark.parametrize("edit_tensors, edit_meta, needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_delta_files_raise_a_clear_error_and_leave_the_model_untouched(
    delta_file, tmp_path, edit_tensors, edit_meta, needle
):
    bad = _resave(delta_file, tmp_path / "bad.safetensors", edit_tensors, edit_meta)
    if needle is None:  # an edit the payload checksum must catch: write the old checksum back
        from safetensors.torch import save_file

        from id3_callback.delta import _read

        meta, tensors = _read(str(bad))
        meta["payload_sha256"] = load_delta(delta_file).metadata["payload_sha256"]
        save_file(tensors, str(bad), metadata=meta)
        needle = "payload checksum does not match"
    model = MLP()
    before = snapshot(model)
    with pytest.raises(DeltaError, match=needle):
        apply_delta(model, bad)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_reader_sees_the_old_or_the_new_delta_never_a_mix(tmp_path):
    """One writer keeps replacing the file (atomically, as save_delta does) with two versions; every load
    meanwhile must succeed and be one of them."""
    versions = []
    for budget in (20, 40):
        trainer = make(tmp_path / str(budget), ID3Config(budget=budget), save_strategy="no")
        trainer.train()
        versions.append(save_delta(trainer, tmp_path / f"v{budget}.safetensors"))
    expected = {load_delta(v).metadata["payload_sha256"] for v in versions}
    target, stop = tmp_path / "live.safetensors", threading.Event()
    shutil.copy(versions[0], target)

    def writer():
        i = 0
        while not stop.is_set():
            tmp = tmp_path / f".tmp{i % 2}"
            shutil.copy(versions[i % 2], tmp)
            os.replace(tmp, target)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = {load_delta(target).metadata["payload_sha256"] for _ in range(200)}
    finally:
        stop.set()
        thread.join()
    assert seen <= expected and seen


def test_a_delta_replaced_after_the_reader_opened_it_is_read_whole_from_the_old_file(tmp_path, monkeypatch):
    """Deterministic form of the race: the file is replaced right after `load_delta` opens it."""
    import builtins

    from id3_callback import delta as delta_module

    versions = []
    for budget in (20, 40):
        trainer = make(tmp_path / str(budget), ID3Config(budget=budget), save_strategy="no")
        trainer.train()
        versions.append(save_delta(trainer, tmp_path / f"v{budget}.safetensors"))
    target = tmp_path / "live.safetensors"
    shutil.copy(versions[0], target)

    def open_then_replace(path, *args, **kwargs):
        f = builtins.open(path, *args, **kwargs)
        shutil.copy(versions[1], tmp_path / ".tmp")
        os.replace(tmp_path / ".tmp", target)  # as save_delta replaces a file
        return f

    monkeypatch.setattr(delta_module, "open", open_then_replace, raising=False)
    assert load_delta(target).num_entries == 20  # the version it opened, whole
    monkeypatch.undo()
    assert load_delta(target).num_entries == 40
