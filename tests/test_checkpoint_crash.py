"""Crash injection during checkpoint saves: whatever fails, a checkpoint remains that resumes bitwise.

A failure raised at every stage of `_save_checkpoint` (in process), and random SIGKILLs of training
subprocesses with `save_total_limit=1` (tests/crash_worker.py). Each interrupted run is resumed with
`resume_from_checkpoint=True` and must end bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers.trainer as hf_trainer
from helpers import MLP, mlp_data, snapshot, training_args
from transformers import Trainer, TrainerState

from id3_callback import ID3Callback, ID3Config, ID3Trainer
from id3_callback import state as state_io
from id3_callback.state import StateError

ARGS = dict(max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1, weight_decay=0.1)


def run(tmp_path, resume=None):
    model = MLP()
    trainer = ID3Trainer(
        model=model,
        args=training_args(tmp_path, **ARGS),
        train_dataset=mlp_data(),
        callbacks=[ID3Callback(ID3Config(budget=60))],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, snapshot(model)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    trainer, weights = run(tmp_path_factory.mktemp("reference"))
    return trainer.engine.unmasked.fingerprint(), weights


class Injected(RuntimeError):
    pass


def fail_on_second_call(fn, half_write=None):
    """`fn`, raising `Injected` on its second call (the save of step 4), after `half_write(args)` if given."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if half_write is not None:
                half_write(args, kwargs)
            raise Injected("injected failure")
        return fn(*args, **kwargs)

    return wrapped


def half_json(args, kwargs):
    state, path = args
    with open(path, "w") as f:
        f.write(json.dumps(dataclasses.asdict(state), indent=2)[:40])  # a torn trainer_state.json


def _rotation():
    if hasattr(hf_trainer, "rotate_checkpoints"):  # transformers 5.x: a module function
        return hf_trainer, "rotate_checkpoints"
    return Trainer, "_rotate_checkpoints"  # 4.x: a method


# Every stage of a checkpoint save, in the order transformers runs them (4.46-5.x), ID3's first.
STAGES = [
    ("id3 state: encode", state_io, "encode", None),
    ("id3 state: write", state_io, "atomic_write", None),
    ("id3 state: folder fsync", state_io, "fsync_dir", None),
    ("model", Trainer, "save_model", None),
    ("optimizer and scheduler", Trainer, "_save_optimizer_and_scheduler", None),
    ("scaler", Trainer, "_save_scaler", None),
    ("rng state", Trainer, "_save_rng_state", None),
    ("trainer_state.json", TrainerState, "save_to_json", None),
    ("trainer_state.json, torn", TrainerState, "save_to_json", half_json),
    ("rotation", *_rotation(), None),
]


@pytest.mark.parametrize("stage, owner, attr, half_write", STAGES, ids=[s[0] for s in STAGES])
def test_a_failure_at_any_stage_of_a_save_leaves_a_resumable_checkpoint(
    tmp_path, monkeypatch, reference, stage, owner, attr, half_write
):
    if not hasattr(owner, attr):
        pytest.skip(f"this transformers version has no {attr}")
    monkeypatch.setattr(owner, attr, fail_on_second_call(getattr(owner, attr), half_write))
    with pytest.raises(Injected):
        run(tmp_path)
    monkeypatch.undo()
    out = tmp_path / "out"
    newest = max(state_io.checkpoints(out), key=lambda f: int(f.rsplit("-", 1)[1]))
    complete = state_io.resumable_checkpoint(out)
    assert complete is not None
    if state_io.incomplete_reason(newest) is not None:  # failed before the folder was complete
        assert newest.endswith("checkpoint-4") and complete.endswith("checkpoint-2")
        with pytest.raises(StateError, match=r"incomplete checkpoint \(interrupted save\?\).*checkpoint-2"):
            run(tmp_path, resume=newest)
    trainer, weights = run(tmp_path, resume=True)
    fingerprint, expected = reference
    assert trainer.engine.unmasked.fingerprint() == fingerprint
    assert all(torch.equal(weights[n], expected[n]) for n in expected), stage


def test_random_sigkills_during_training_always_leave_a_checkpoint_that_resumes_bitwise(tmp_path):
    """20 training subprocesses killed at random moments (checkpoint each step, save_total_limit=1)."""
    trials = 20
    tests = os.path.dirname(os.path.abspath(__file__))
    path = [os.path.dirname(tests), os.environ.get("PYTHONPATH")]  # this checkout's package first
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    worker = os.path.join(tests, "crash_worker.py")
    done = subprocess.run(
        [sys.executable, worker, str(tmp_path), str(trials), "0"],
        cwd=tests,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    killed = result["trials"]
    assert len(killed) == trials, result
    assert all(t["bitwise"] for t in killed), [t for t in killed if not t["bitwise"]]
    # The kills landed inside saves, not only between them: some left a folder without trainer_state.json.
    assert any("no trainer_state.json" in reason for t in killed for reason in t["folders"].values()), killed
