#!/usr/bin/env python
"""How ID3's selection holds up when other torch jobs share the CPU: idle against a load this script makes.

    python benchmarks/bench_contention.py        # writes benchmarks/results/contention.json + contention.md

The load: two competing processes, each a torch matmul loop on 2 threads (started and stopped here).
Phases alternate idle, load, idle, load, ...; in each, every variant takes `--steps` steps, interleaved
step by step (order rotating), the same batches for all. Per variant and condition: medians of the
backward (forward + backward), of `engine.step`, and of the whole step (+ optimizer step, zero_grad).

Variants, on MiniLM (16 x 64 SST-2 tokens) and SmolLM2-135M (fp32, 4 x 64 XSum tokens), 2 threads,
budget 0.17%, mid-schedule (half the budget unmasked, chosen by D3 on a warm-up batch):
- `full`: full fine-tuning, fused AdamW, plain loop;
- `id3_threads`: the plain loop (`ID3Engine`, dense gradients) with the selection on torch's threads
  (`selection.SELECTION_THREADS = None`, the code before this benchmark);
- `id3`: the same with the selection on one thread (`SELECTION_THREADS = 1`, the default now);
- `trainer_full` / `trainer_id3`: the Trainer's own `training_step` (HF `Trainer`, and `ID3Trainer` with
  its defaults: row-sparse embedding gradients), driven step by step so they interleave too.

Targets (issue 20): under load, engine.step slows at most 1.25x as much as the backward does, and ID3's
step ratio to full fine-tuning stays within 1.10x of its idle ratio.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path[:0] = [
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
]

import benchutil  # noqa: E402

from id3_callback import ID3Config, ID3Engine, SparseAdamW  # noqa: E402
from id3_callback import selection as selection_mod  # noqa: E402

LOAD_JOB = (
    "import torch, sys\n"
    "torch.set_num_threads(int(sys.argv[1]))\n"
    "a = torch.randn(512, 512)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)
BUDGET, TOTAL_STEPS = 0.0017, 1000


class Load:
    """`jobs` competing torch processes of `threads` threads each, between start() and stop()."""

    def __init__(self, jobs: int = 2, threads: int = 2) -> None:
        self.jobs, self.threads, self.procs = jobs, threads, []

    def start(self) -> None:
        self.procs = [
            subprocess.Popen([sys.executable, "-c", LOAD_JOB, str(self.threads)]) for _ in range(self.jobs)
        ]
        time.sleep(2.0)  # imported and spinning

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=30)
        self.procs = []
        time.sleep(1.0)


class PlainVariant:
    def __init__(self, name, model, opt, engine=None, threads=None):
        self.name, self.model, self.opt, self.engine, self.threads = name, model, opt, engine, threads

    def step(self, batch) -> dict[str, float]:
        selection_mod.SELECTION_THREADS = self.threads
        t0 = time.perf_counter()
        self.model(**batch).loss.backward()
        t1 = time.perf_counter()
        if self.engine is not None:
            self.engine.step()
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"backward": (t1 - t0) * 1e3, "engine": (t2 - t1) * 1e3, "step": (t3 - t0) * 1e3}


class TrainerVariant:
    """A Trainer's `training_step` + optimizer step, driven by hand (so it interleaves with the others)."""

    def __init__(self, name, trainer, threads=1):
        self.name, self.trainer, self.threads = name, trainer, threads
        trainer.current_gradient_accumulation_steps = 1  # what `train()` would set: no accumulation
        self.engine_ms = 0.0
        engine = getattr(trainer, "engine", None)
        if engine is not None:
            original = engine.step

            def timed(*a, **kw):
                t = time.perf_counter()
                try:
                    return original(*a, **kw)
                finally:
                    self.engine_ms += (time.perf_counter() - t) * 1e3

            engine.step = timed

    def step(self, batch) -> dict[str, float]:
        selection_mod.SELECTION_THREADS = self.threads
        self.engine_ms = 0.0
        trainer, model = self.trainer, self.trainer.model
        t0 = time.perf_counter()
        trainer.training_step(model, batch)
        t1 = time.perf_counter()
        trainer.optimizer.step()
        model.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        return {
            "backward": (t1 - t0) * 1e3 - self.engine_ms,
            "engine": self.engine_ms,
            "step": (t2 - t0) * 1e3,
        }


def mid_set(base, batch) -> dict:
    probe = copy.deepcopy(base)
    engine = ID3Engine(probe, ID3Config(budget=BUDGET, sparse_embedding_grads=False))
    engine.start(TOTAL_STEPS)
    probe(**batch).loss.backward()
    _, index = engine.scan.top_by_gradient(engine.schedule.target(TOTAL_STEPS // 2), engine.method.score_fn())
    engine.add_global(index)
    return engine.unmasked.state_dict()


def build(model_name: str, args, tmp: str):
    if model_name == "minilm":
        base = benchutil.minilm_classifier()
        batches = benchutil.sst2_batches(benchutil.minilm_tokenizer(), args.batches, 16, 64)
    else:
        loaded, tokenizer = benchutil.smollm()
        # A GGUF-loaded model counts as quantized for the Trainer: rebuild it as a plain one.
        from transformers import AutoModelForCausalLM

        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        base.load_state_dict(loaded.state_dict())
        del loaded
        base.config.use_cache = False
        batches = benchutil.xsum_batches(tokenizer, args.batches, 4, 64)
    base.train()
    state = mid_set(base, batches[0])
    variants = []
    model = copy.deepcopy(base)
    variants.append(PlainVariant("full", model, torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)))
    for name, threads in (("id3_threads", None), ("id3", 1)):
        model = copy.deepcopy(base)
        engine = ID3Engine(model, ID3Config(budget=BUDGET, sparse_embedding_grads=False))
        engine.start(TOTAL_STEPS)
        engine.unmasked.load_state_dict(state)
        engine.steps_done = TOTAL_STEPS // 2
        opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=2e-5)
        variants.append(PlainVariant(name, model, opt, engine, threads))
    if args.trainer:
        from transformers import Trainer, TrainingArguments

        from id3_callback import ID3Callback, ID3Trainer

        targs = TrainingArguments(
            output_dir=tmp,
            learning_rate=2e-5,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            save_strategy="no",
        )
        full = Trainer(model=copy.deepcopy(base), args=targs)
        full.create_optimizer()
        variants.append(TrainerVariant("trainer_full", full))
        trainer = ID3Trainer(
            model=copy.deepcopy(base), args=targs, callbacks=[ID3Callback(ID3Config(budget=BUDGET))]
        )
        trainer.engine.start(TOTAL_STEPS)
        trainer.engine.unmasked.load_state_dict(state)
        trainer.engine.steps_done = TOTAL_STEPS // 2
        trainer.create_optimizer()
        variants.append(TrainerVariant("trainer_id3", trainer))
    return variants, batches


def run_model(model_name: str, args, load: Load) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        variants, batches = build(model_name, args, tmp)
        records = {v.name: {"idle": [], "load": []} for v in variants}
        i = 0
        for _ in range(args.warmup):
            for v in variants:
                v.step(batches[i % len(batches)])
            i += 1
        for phase in range(args.phases):
            condition = "load" if phase % 2 else "idle"
            if condition == "load":
                load.start()
            try:
                for _ in range(args.steps):
                    batch = batches[i % len(batches)]
                    order = variants[i % len(variants) :] + variants[: i % len(variants)]
                    for v in order:
                        records[v.name][condition].append(v.step(batch))
                    i += 1
            finally:
                if condition == "load":
                    load.stop()
            print(f"[contention] {model_name} phase {phase} ({condition}) done", flush=True)
    out = {}
    for name, by in records.items():
        row = {}
        for condition, rec in by.items():
            row[condition] = {key: statistics.median(r[key] for r in rec) for key in rec[0]}
        idle, loaded = row["idle"], row["load"]
        row["backward_slowdown"] = loaded["backward"] / idle["backward"]
        if "id3" in name:
            row["engine_slowdown"] = loaded["engine"] / idle["engine"]
            row["engine_vs_backward_slowdown"] = row["engine_slowdown"] / row["backward_slowdown"]
        out[name] = row
    for name, full in (("id3_threads", "full"), ("id3", "full"), ("trainer_id3", "trainer_full")):
        if name in out and full in out:
            ratios = {}
            for condition in ("idle", "load"):
                pairs = zip(records[name][condition], records[full][condition])
                ratios[condition] = statistics.median(a["step"] / b["step"] for a, b in pairs)
            out[name]["ratio_vs_full"] = ratios
            out[name]["ratio_load_vs_idle"] = ratios["load"] / ratios["idle"]
    return out


def markdown(result: dict) -> str:
    s = result["setting"]
    lines = [
        "# ID3 under CPU contention",
        "",
        f"Load: {s['load']}. {s['threads']} threads here; phases idle/load alternating, {s['steps']} steps "
        f"per phase per variant, {s['phases']} phases; medians. Machine load before the run: "
        f"{result['machine']['load_1min']}.",
        "",
        "Targets: engine.step slowdown / backward slowdown <= 1.25; (ratio to full under load) / (idle ratio) <= 1.10.",
        "",
    ]
    header = ["model", "variant", "backward idle ms", "backward load ms", "engine idle ms", "engine load ms"]
    header += ["engine/backward slowdown", "x full idle", "x full load", "load/idle ratio"]
    rows = []
    for model, variants in result["models"].items():
        for name, r in variants.items():
            ratio = r.get("ratio_vs_full", {})
            rows.append(
                [
                    model,
                    name,
                    r["idle"]["backward"],
                    r["load"]["backward"],
                    r["idle"]["engine"],
                    r["load"]["engine"],
                    r.get("engine_vs_backward_slowdown"),
                    ratio.get("idle"),
                    ratio.get("load"),
                    r.get("ratio_load_vs_idle"),
                ]
            )
    lines.append(benchutil.markdown_table(header, rows))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per phase")
    parser.add_argument("--phases", type=int, default=4, help="idle, load, idle, load, ...")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--no-trainer", dest="trainer", action="store_false")
    parser.add_argument("--jobs", type=int, default=2, help="competing torch processes")
    parser.add_argument("--job-threads", type=int, default=2)
    parser.add_argument("--out", default=str(benchutil.RESULTS / "contention.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = Load(args.jobs, args.job_threads)
    result = {
        "benchmark": "contention",
        "setting": {
            "load": f"{args.jobs} torch processes, {args.job_threads} threads each, 512x512 matmul + tanh loops",
            "threads": args.threads,
            "steps": args.steps,
            "phases": args.phases,
            "budget_fraction": BUDGET,
        },
        "machine": benchutil.machine(),
        "models": {},
    }
    for model_name in args.models.split(","):
        result["models"][model_name] = run_model(model_name, args, load)
        benchutil.save_result(result, args.out, markdown)  # after each model: a later failure keeps it
    selection_mod.SELECTION_THREADS = 1
    return result


if __name__ == "__main__":
    main()
