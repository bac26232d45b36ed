"""SIGKILL trials for tests/test_checkpoint_crash.py: `python crash_worker.py OUT TRIALS SEED` writes OUT/result.json.

This process imports torch and transformers once and computes nothing itself; every training run is a
forked child (one thread each, two trials at a time), so a trial costs a fork, not an interpreter start.
Per trial a child trains with a checkpoint at every step and `save_total_limit=1`; once its first
checkpoint is complete, this process SIGKILLs it at a random moment (often inside a save, since saves take
most of the time). A second child resumes from `resume_from_checkpoint=True` and compares the result
bitwise with an uninterrupted run.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch: forked children must not inherit an OpenMP pool

import json
import random
import select
import signal
import sys
import time
import traceback

import torch
from helpers import MLP, mlp_data

from id3_callback import ID3Callback, ID3Config, ID3Trainer
from id3_callback import state as state_io
from id3_callback.logging import MaskHeatmapCallback

STEPS = 10


def train(out_dir: str, resume: bool = False, notify: int | None = None):
    from transformers import TrainerCallback, TrainingArguments

    class Notify(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if notify is not None:
                os.write(notify, b"s")

    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = MLP()
    trainer = ID3Trainer(
        model=model,
        args=args,
        train_dataset=mlp_data(),
        callbacks=[ID3Callback(ID3Config(budget=60)), Notify()],
    )
    trainer.remove_callback(MaskHeatmapCallback)  # a PNG at train end: time this test does not need
    trainer.train(resume_from_checkpoint=True if resume else None)
    engine = trainer.engine
    return {n: p.detach().clone() for n, p in model.named_parameters()}, engine.unmasked.fingerprint()


def in_child(fn) -> int:
    """Run `fn` in a forked child; returns its pid (the child exits 0, or 1 after printing a traceback)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # the Trainer's log lines; tracebacks still reach stderr
        try:
            torch.set_num_threads(1)
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def reference(out: str) -> float:
    """The uninterrupted run; returns the seconds from its first complete checkpoint to its last."""
    r, w = os.pipe()

    def run():
        os.close(r)
        weights, fingerprint = train(os.path.join(out, "reference"), notify=w)
        torch.save({"weights": weights, "fingerprint": fingerprint}, os.path.join(out, "reference.pt"))

    pid = in_child(run)
    os.close(w)
    os.read(r, 1)
    start = time.perf_counter()
    for _ in range(STEPS - 1):
        os.read(r, 1)
    window = time.perf_counter() - start
    _, status = os.waitpid(pid, 0)
    os.close(r)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("the reference run failed")
    return window


def start_resume(out: str, trial_dir: str) -> int:
    """Fork a child that resumes `trial_dir` and writes whether it ended bitwise equal to the reference."""

    def run():
        folders = {
            os.path.basename(f): state_io.incomplete_reason(f) or "complete"
            for f in state_io.checkpoints(trial_dir)
        }
        weights, fingerprint = train(trial_dir, resume=True)
        ref = torch.load(os.path.join(out, "reference.pt"))
        bitwise = fingerprint == ref["fingerprint"] and all(
            torch.equal(weights[n], ref["weights"][n]) for n in weights
        )
        with open(os.path.join(trial_dir, "result.json"), "w") as f:
            json.dump({"folders": folders, "bitwise": bitwise}, f)

    return in_child(run)


def kill_batch(runs: list[dict]) -> list[dict]:
    """Start a training child per run; SIGKILL each `delay` seconds after its first complete checkpoint.
    Returns the runs that were killed while training (not those that finished first)."""
    for run in runs:
        r, w = os.pipe()
        run["pid"] = in_child(lambda r=r, w=w, d=run["dir"]: (os.close(r), train(d, notify=w)))
        os.close(w)
        run["pipe"], run["deadline"] = r, None
    pending = list(runs)
    while pending:
        waiting = [run["pipe"] for run in pending if run["deadline"] is None]
        deadlines = [run["deadline"] for run in pending if run["deadline"] is not None]
        timeout = max(0.0, min(deadlines) - time.perf_counter()) if deadlines else None
        readable = select.select(waiting, [], [], timeout)[0] if waiting else time.sleep(timeout) or []
        now = time.perf_counter()
        for run in list(pending):
            if run["pipe"] in readable:
                if os.read(run["pipe"], 1):  # its first checkpoint is complete
                    run["deadline"] = now + run["delay"]
                else:  # it died before its first checkpoint
                    pending.remove(run)
            elif run["deadline"] is not None and now >= run["deadline"]:
                os.kill(run["pid"], signal.SIGKILL)
                pending.remove(run)
    killed = []
    for run in runs:
        _, status = os.waitpid(run["pid"], 0)
        os.close(run["pipe"])
        if run["deadline"] is not None and os.WIFSIGNALED(status):
            killed.append(run)
        elif os.waitstatus_to_exitcode(status) != 0:  # a training error, not a kill: the test must fail
            raise RuntimeError(f"trial {run['trial']}: the training child failed (see stderr)")
    return killed


def main(out: str, trials: int, seed: int, concurrent: int = 2) -> None:
    rng = random.Random(seed)
    window = reference(out)
    results, attempts = [], 0
    while len(results) < trials and attempts < 3 * trials:
        batch = []
        for _ in range(min(concurrent, trials - len(results))):
            attempts += 1
            # from checkpoint 1 complete to checkpoint STEPS complete, in the uninterrupted run
            delay = rng.uniform(0.0, window)
            batch.append({"trial": attempts, "dir": os.path.join(out, f"trial{attempts}"), "delay": delay})
        killed = kill_batch(batch)
        resumes = [(run, start_resume(out, run["dir"])) for run in killed]
        for run, pid in resumes:
            _, status = os.waitpid(pid, 0)
            result_file = os.path.join(run["dir"], "result.json")
            if os.waitstatus_to_exitcode(status) == 0 and os.path.exists(result_file):
                with open(result_file) as f:
                    outcome = json.load(f)
            else:
                outcome = {"bitwise": False, "error": "the resumed run failed (see stderr)"}
            results.append({"trial": run["trial"], "kill_after_s": round(run["delay"], 4), **outcome})
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"window_s": window, "attempts": attempts, "trials": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
