#!/usr/bin/env python
"""The ID3 replication study (issue 6): all-MiniLM-L6-v2 on real GLUE data, every method, three seeds.

One command runs everything and resumes where it stopped; each finished run appends one JSON line:

    python benchmarks/study/run_study.py --phase all --max-minutes 120     # lr, then main, then sensitivity
    python benchmarks/study/run_study.py --dry-run                         # print the plan and what is done
    python benchmarks/study/report.py                                      # docs/RESULTS_v1.md + plots

This is study v1 (100 steps; superseded by study v2, benchmarks/study/v2.py, whose runs it executes).

Phases (a run is skipped when its key is already in the results file):
  lr           each method's learning rate, from a 3-value grid, on SST-2, scored on a held-out 10% slice of
               the *training* data (the model trains on the other 90%; dev is never looked at);
  main         seed-major: for seed in 0,1,2, task in rte,mrpc,cola,sst2, budget in 0.06%,0.17%: every method,
               at the learning rate the lr phase chose, scored on the full dev set;
  sensitivity  ID3's eps x exp grid on SST-2 dev at the 0.17% budget.
repeat-S rescores all 22.7M entries every step (a fresh top-B: its selection takes about a third of a
forward + backward here), so its lr and main runs come after everything else.

Runs call `scripts/run_glue.py`'s `main(argv)` in-process (its `_common.finish` is wrapped for the length of
the call to read the engine's update count). The official `selective-optimizers` ID3 runs through its own
optimizer class in a plain `Trainer(optimizers=(opt, None))`, only when importable (`--official-site`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GLUE_DIR = ROOT.parent / "shared" / "data" / "glue"
DEFAULT_RESULTS = HERE / "results.jsonl"
# The prepared .jsonl files; ID3_STUDY_DATA points elsewhere (the device mode carries them to a machine
# without ../shared: benchmarks/study/device_v2.sh).
DATA_CACHE = Path(os.environ.get("ID3_STUDY_DATA") or Path(tempfile.gettempdir()) / "id3-study-data-v1")

TASKS = ("rte", "mrpc", "cola", "sst2")
BUDGETS = (0.0006, 0.0017)  # the paper's 103K and 320K on DeBERTa-v3-base (184M), as fractions
SEEDS = (0, 1, 2)
# CoLA at seed 0 only: in 100 steps every method stayed at the majority class there (Matthews correlation
# exactly 0: full fine-tuning, ID3, static-S in the first runs), so more seeds add ties, not information.
TASK_SEEDS = {"cola": (0,)}
# SST-2: the cheapest task per step (short sentences) and far above chance for MiniLM, with an 800-row held-out
# slice; on RTE (near chance) or MRPC (367 held-out rows) the lr ranking would be mostly noise.
LR_TASK = "sst2"
LR_BUDGET = 0.0017
SENS_TASK = "sst2"
SENS_EPS = (1e-3, 1e-2, 1e-1, 1.0)
SENS_EXP = (0.0, 1.0, 2.0)
DEFAULT_EPS, DEFAULT_EXP = 1e-3, 1.0
SST2_TRAIN_ROWS = 8000
HOLDOUT_FRACTION = 0.1
LORA_RANK = 8


@dataclass(frozen=True)
class MethodSpec:
    engine_method: str | None  # the ID3Config.method; None for the official package
    lora: bool  # on LoRA adapters (rank LORA_RANK, peft's default targets: query, value)
    budgeted: bool  # runs at each budget; False: one run whose size the method fixes (full, bitfit, LoRA)
    lr_grid: tuple[float, ...]
    slow: bool = False  # deferred to the end of the study (repeat-S rescores every entry each step)
    # Main phase at both budgets, or at 0.17% only. Sized to a 2-core machine: the small budget is kept for
    # ID3 and the selections the paper compares it with there (FISH, the best static one; static-S D3).
    both_budgets: bool = True
    scheduler: str = "uniform"  # ID3Config.scheduler (study v2's ablation runs ID3 with "front_loaded")


SPARSE_LRS = (1e-3, 2e-3, 5e-3)
METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec("full", False, False, (2e-5, 5e-5, 1e-4)),
    "id3": MethodSpec("id3", False, True, SPARSE_LRS),
    "static": MethodSpec("static", False, True, SPARSE_LRS),
    "repeat": MethodSpec("repeat", False, True, SPARSE_LRS, slow=True, both_budgets=False),
    "pafi": MethodSpec("pafi", False, True, SPARSE_LRS, both_budgets=False),
    "fish": MethodSpec("fish", False, True, SPARSE_LRS),
    "random": MethodSpec("random", False, True, SPARSE_LRS, both_budgets=False),
    "bitfit": MethodSpec("bitfit", False, False, SPARSE_LRS),
    "official-id3": MethodSpec(None, False, True, SPARSE_LRS, both_budgets=False),
    "lora": MethodSpec("full", True, False, (2e-4, 5e-4, 1e-3)),
    "id3-lora": MethodSpec("id3", True, True, (5e-4, 1e-3, 2e-3), both_budgets=False),
}
# Study v2 only (its scheduler ablation): ID3 with every entry unmasked in the first quarter of the steps.
V2_ONLY_METHODS = {"id3-front": MethodSpec("id3", False, True, SPARSE_LRS, scheduler="front_loaded")}
ALL_METHODS = {**METHODS, **V2_ONLY_METHODS}


@dataclass(frozen=True)
class Protocol:
    """Settings shared by every run of a study; its name is part of each run's key."""

    steps: int = 100
    batch_size: int = 16
    max_seq_length: int = 64
    eval_batch_size: int = 64
    warmup: float = 0.06
    max_eval_samples: int | None = None
    fisher_samples: int = 1024  # FISH's estimate (the paper's setting); smoke runs use a few
    tag: str = ""  # "v2" for study v2 (benchmarks/study/v2.py); v1 names stay as they were

    @property
    def name(self) -> str:
        extra = f"-e{self.max_eval_samples}" if self.max_eval_samples else ""
        extra += f"-f{self.fisher_samples}" if self.fisher_samples != 1024 else ""
        tag = f"{self.tag}-" if self.tag else ""
        return f"minilm-{tag}T{self.steps}-b{self.batch_size}-L{self.max_seq_length}{extra}"


@dataclass(frozen=True)
class Run:
    phase: str
    task: str
    method: str
    budget: float | None
    seed: int
    lr: float
    eps: float
    exp: float
    lora: int
    protocol: str

    def key(self) -> tuple:
        return run_key(asdict(self))


KEY_FIELDS = ("phase", "task", "method", "budget", "seed", "lr", "eps", "exp", "lora", "protocol")


def run_key(record: dict) -> tuple:
    """The identity of a run; floats are rounded so a JSON round trip keeps the key.

    Example:
        >>> run_key({"phase": "lr", "task": "mrpc", "method": "id3", "budget": 0.0017, "seed": 0,
        ...          "lr": 0.002, "eps": 0.001, "exp": 1.0, "lora": 0, "protocol": "p"})[:3]
        ('lr', 'mrpc', 'id3')
    """
    out = []
    for name in KEY_FIELDS:
        value = record.get(name)
        out.append(float(f"{value:.6g}") if isinstance(value, float) else value)
    return tuple(out)


# ------------------------------------------------------------------------------------------------ results
def load_results(path: Path) -> list[dict]:
    """Every complete JSON line of the results file (a torn last line from a killed run is ignored)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_result(path: Path, record: dict) -> None:
    """One line per run, flushed and fsynced, so a crash loses at most the run in progress."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def done_keys(records: list[dict], retry_errors: bool = False) -> set[tuple]:
    return {run_key(r) for r in records if not (retry_errors and r.get("status") != "ok")}


# ------------------------------------------------------------------------------------------------ planning
def lr_plan(protocol: Protocol, methods: list[str], smoke: bool = False) -> list[Run]:
    runs = []
    for method in [m for m in METHODS if m in methods]:
        spec = METHODS[method]
        grid = spec.lr_grid[1:2] if smoke else spec.lr_grid
        for lr in grid:
            budget = LR_BUDGET if spec.budgeted else None
            runs.append(
                Run(
                    "lr", LR_TASK, method, budget, 0, lr, DEFAULT_EPS, DEFAULT_EXP, _rank(spec), protocol.name
                )
            )
    return runs


def chosen_lrs(records: list[dict], protocol: str, methods: list[str]) -> dict[str, float]:
    """Per method, the grid value with the best held-out score (ties: the smaller lr)."""
    best: dict[str, tuple[float, float]] = {}
    for r in records:
        if r.get("phase") != "lr" or r.get("protocol") != protocol or r.get("status") != "ok":
            continue
        method, score, lr = r["method"], r.get("score"), r["lr"]
        if method not in methods or score is None or not math.isfinite(score):
            continue
        if method not in best or (score, -lr) > (best[method][0], -best[method][1]):
            best[method] = (score, lr)
    return {m: v[1] for m, v in best.items()}


def main_plan(protocol: Protocol, lrs: dict[str, float], methods: list[str], tasks, seeds) -> list[Run]:
    runs = []
    for seed in seeds:
        for task in [t for t in tasks if seed in TASK_SEEDS.get(t, (seed,))]:
            for i, budget in enumerate(BUDGETS):
                for method in [m for m in METHODS if m in methods]:
                    spec = METHODS[method]
                    if method not in lrs or (not spec.budgeted and i > 0):
                        continue
                    if spec.budgeted and not spec.both_budgets and budget != LR_BUDGET:
                        continue
                    runs.append(
                        Run(
                            "main",
                            task,
                            method,
                            budget if spec.budgeted else None,
                            seed,
                            lrs[method],
                            DEFAULT_EPS,
                            DEFAULT_EXP,
                            _rank(spec),
                            protocol.name,
                        )
                    )
    return runs


def sensitivity_plan(protocol: Protocol, lr: float, smoke: bool = False) -> list[Run]:
    eps_values, exp_values = (SENS_EPS[:1], SENS_EXP[:2]) if smoke else (SENS_EPS, SENS_EXP)
    return [
        Run("sensitivity", SENS_TASK, "id3", LR_BUDGET, 0, lr, eps, exp, 0, protocol.name)
        for eps in eps_values
        for exp in exp_values
    ]


def planned_total(methods: list[str], tasks, seeds) -> dict[str, int]:
    """How many runs each phase has in the full plan (for the report's progress line)."""
    protocol, fake = Protocol(), {m: 1.0 for m in methods}
    return {
        "lr": len(lr_plan(protocol, methods)),
        "main": len(main_plan(protocol, fake, methods, tasks, seeds)),
        "sensitivity": len(sensitivity_plan(protocol, 1.0)),
    }


def _rank(spec: MethodSpec) -> int:
    return LORA_RANK if spec.lora else 0


# ------------------------------------------------------------------------------------------------ data
def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def prepare_data(
    task: str, purpose: str, glue_dir: Path = GLUE_DIR, cache: Path = DATA_CACHE
) -> tuple[Path, Path]:
    """(train file, evaluation file) for a task: `main` = training rows + full dev set; `holdout` = 90% / 10%
    of the training rows (a fixed split, seed 1). SST-2 uses a fixed 8,000-row training subset (seed 0).

    The files are .jsonl with the loader's own columns, cached under the temp dir (rebuilt when missing).
    """
    train_path, eval_path = cache / f"{task}-{purpose}-train.jsonl", cache / f"{task}-{purpose}-eval.jsonl"
    if train_path.is_file() and eval_path.is_file():
        return train_path, eval_path
    import numpy as np

    from id3_callback.data import load_glue

    if not glue_dir.is_dir():
        raise FileNotFoundError(f"GLUE data not found at {glue_dir}: the study reads ../shared/data/glue.")
    raw = load_glue(task, glue_dir=glue_dir, splits=["train", "validation"])
    pair = task in ("mrpc", "rte")

    def rows(ds, index) -> list[dict]:
        cols = {c: ds[c] for c in ("sentence1", "sentence2", "label") if c in ds.column_names}
        out = []
        for i in index:
            row = {"sentence1": cols["sentence1"][i], "label": int(cols["label"][i])}
            if pair:
                row["sentence2"] = cols["sentence2"][i]
            out.append(row)
        return out

    train = raw["train"]
    index = list(range(len(train)))
    if task == "sst2":
        index = sorted(np.random.default_rng(0).permutation(len(train))[:SST2_TRAIN_ROWS].tolist())
    if purpose == "main":
        train_rows, eval_rows = rows(train, index), rows(raw["validation"], range(len(raw["validation"])))
    elif purpose == "holdout":
        order = np.random.default_rng(1).permutation(len(index)).tolist()
        n_hold = round(HOLDOUT_FRACTION * len(index))
        hold, keep = sorted(order[:n_hold]), sorted(order[n_hold:])
        train_rows, eval_rows = rows(train, [index[i] for i in keep]), rows(train, [index[i] for i in hold])
    else:
        raise ValueError(f"purpose must be 'main' or 'holdout' (got {purpose!r}).")
    _write_jsonl_atomic(train_path, train_rows)
    _write_jsonl_atomic(eval_path, eval_rows)
    return train_path, eval_path


# ------------------------------------------------------------------------------------------------ scoring
def task_score(task: str, metrics: dict, prefix: str = "eval") -> float | None:
    """The study's one number per run: accuracy (SST-2, RTE), mean of F1 and accuracy (MRPC, as in the
    GLUE average), Matthews correlation (CoLA); x100. `prefix`: the metrics' key prefix (v2 also has "dev")."""
    get = metrics.get
    if task == "mrpc":
        acc, f1 = get(f"{prefix}_accuracy"), get(f"{prefix}_f1")
        return None if acc is None or f1 is None else 50.0 * (acc + f1)
    name = f"{prefix}_matthews_correlation" if task == "cola" else f"{prefix}_accuracy"
    value = get(name)
    return None if value is None else 100.0 * value


def majority_score(task: str, labels: list[int]) -> float:
    """The task score of always predicting the most frequent label of `labels` (the "learns nothing" line).

    Example:
        >>> round(majority_score("mrpc", [1, 1, 0]), 2)  # acc 2/3, F1 0.8
        73.33
    """
    if task == "cola":
        return 0.0  # Matthews correlation of a constant prediction
    top = max(set(labels), key=labels.count)
    acc = labels.count(top) / len(labels)
    if task == "mrpc":
        f1 = 2 * acc / (acc + 1) if top == 1 else 0.0  # precision = acc, recall 1 on the positive class
        return 50.0 * (acc + f1)
    return 100.0 * acc


# ------------------------------------------------------------------------------------------------ runners
class Context:
    """What every run needs once: the pretrained weights (to count changed entries) and the base budget."""

    def __init__(self, protocol: Protocol, official_site: str | None) -> None:
        from safetensors.torch import load_file

        sys.path.insert(0, str(ROOT / "scripts"))
        import _common

        self.protocol = protocol
        folder, _ = _common.resolve_model("minilm")
        self.pretrained = load_file(os.path.join(folder, "model.safetensors"))
        # Base-model entries the budgets are fractions of: every pretrained weight (the new head is dense).
        self.base_entries = int(sum(t.numel() for t in self.pretrained.values() if t.is_floating_point()))
        self.official_site = official_site
        if official_site and os.path.isdir(official_site) and official_site not in sys.path:
            sys.path.append(official_site)
        self.official_ok = _official_importable()
        self.versions = software_versions()
        self.host = host_info()

    def budget_count(self, fraction: float) -> int:
        return max(1, round(fraction * self.base_entries))

    def changed_entries(self, model) -> int | None:
        """Pretrained entries that differ from the checkpoint after training (head excluded; None on LoRA)."""
        import torch

        changed, matched = 0, 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                key = name.split(".", 1)[1] if name.startswith("bert.") else name
                before = self.pretrained.get(key)
                if before is None or before.shape != p.shape:
                    continue
                matched += 1
                changed += int((p.detach().cpu() != before).sum())
        return changed if matched else None


def _official_importable() -> bool:
    import importlib.util

    try:
        if importlib.util.find_spec("selective_optimizers") is None:
            return False
        import selective_optimizers.wrap  # noqa: F401
    except Exception:
        return False
    return True


def software_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "datasets", "numpy", "accelerate", "id3-callback"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["selective-optimizers"] = metadata.version("selective-optimizers")
    except metadata.PackageNotFoundError:
        out["selective-optimizers"] = None
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def host_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
    }


def glue_argv(
    run: Run,
    protocol: Protocol,
    train_file: Path,
    eval_file: Path,
    output_dir: str,
    ctx: Context,
    device: str = "cpu",
) -> list[str]:
    spec = ALL_METHODS[run.method]
    argv = [
        "--model_name_or_path", "minilm",
        "--task_name", run.task,
        "--train_file", str(train_file),
        "--validation_file", str(eval_file),
        "--max_seq_length", str(protocol.max_seq_length),
        "--per_device_train_batch_size", str(protocol.batch_size),
        "--per_device_eval_batch_size", str(protocol.eval_batch_size),
        "--max_steps", str(protocol.steps),
        "--learning_rate", repr(run.lr),
        "--warmup_steps", repr(protocol.warmup),
        "--weight_decay", "0.0",
        "--seed", str(run.seed),
        "--method", spec.engine_method or "id3",
        "--eps", repr(run.eps),
        "--exp", repr(run.exp),
        "--lora_r", str(run.lora),
        "--output_dir", output_dir,
        "--save_strategy", "no",
        "--eval_strategy", "no",
        "--report_to", "none",
        "--logging_steps", str(max(1, protocol.steps // 10)),
        "--disable_tqdm", "true",
        "--use_cpu", "true" if device == "cpu" else "false",
        "--dataloader_num_workers", "0",
        "--do_train", "--do_eval",
    ]  # fmt: skip
    if spec.scheduler != "uniform":
        argv += ["--scheduler", spec.scheduler]
    if run.budget is not None:
        # A count of base-model entries, so the LoRA runs get the same number of trainable entries.
        argv += ["--budget", str(ctx.budget_count(run.budget))]
    if not spec.budgeted and spec.engine_method == "full":
        # Dense training (full FT, dense LoRA): the Trainer's own AdamW, far cheaper than the per-entry
        # SparseAdamW on 22.7M entries and the same update when every entry trains from step 1.
        argv += ["--optimizer", "trainer"]
    if spec.engine_method == "fish":
        argv += ["--fisher_samples", str(protocol.fisher_samples)]
    if protocol.max_eval_samples:
        argv += ["--max_eval_samples", str(protocol.max_eval_samples)]
    return argv


def run_files(run: Run, dev: bool) -> tuple[Path, Path, Path | None]:
    """(train, evaluation, dev) files of a run. v1: `lr` runs train on 90% and score the held-out 10%, `main`
    runs train on everything and score dev. v2 (`dev=True`): every run trains on the 90% and is scored on both
    the held-out 10% (to choose its learning rate) and dev (what is reported), so no run is made twice."""
    if dev:
        train_file, holdout_file = prepare_data(run.task, "holdout")
        return train_file, holdout_file, prepare_data(run.task, "main")[1]
    train_file, eval_file = prepare_data(run.task, "holdout" if run.phase == "lr" else "main")
    return train_file, eval_file, None


def evaluate_dev(trainer, task_name: str, dev_file: Path, protocol: Protocol) -> dict:
    """The trained model on the dev file, tokenized as run_glue does; metrics prefixed `dev_`."""
    import run_glue

    from id3_callback.data import GLUE_TASKS, load_glue

    tokenizer = trainer.processing_class
    max_len = min(protocol.max_seq_length, tokenizer.model_max_length)
    raw = load_glue(task_name, validation_file=dev_file)["validation"]
    if protocol.max_eval_samples and protocol.max_eval_samples < len(raw):
        raw = raw.select(range(protocol.max_eval_samples))
    tokenize = run_glue.tokenize_function(tokenizer, GLUE_TASKS[task_name], max_len)
    ds = raw.map(tokenize, batched=True, remove_columns=[c for c in raw.column_names if c != "label"])
    metrics = trainer.evaluate(eval_dataset=ds, metric_key_prefix="dev")
    metrics["dev_samples"] = len(ds)
    metrics["dev_majority"] = majority_score(task_name, list(raw["label"]))
    return metrics


def execute_engine(
    run: Run, protocol: Protocol, ctx: Context, output_dir: str, dev: bool = False, device: str = "cpu"
) -> dict:
    """One run through `run_glue.main`; `_common.finish` is wrapped to reach the trainer's engine."""
    import _common
    import run_glue

    train_file, eval_file, dev_file = run_files(run, dev)
    argv = glue_argv(run, protocol, train_file, eval_file, output_dir, ctx, device)
    captured: dict = {}
    original = _common.finish

    def finish(trainer, output_dir, metrics, *args, **kwargs):
        if dev_file is not None:
            metrics.update(evaluate_dev(trainer, run.task, dev_file, protocol))
        engine = trainer.engine
        captured.update(
            steps=engine.steps_done,
            updates_total=engine.updates_total,
            dense_entries=engine.dense_entries,
            skipped_steps=engine.skipped_steps,
            changed_entries=None if run.lora else ctx.changed_entries(trainer.model),
            loss_curve=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        )
        return original(trainer, output_dir, metrics, *args, **kwargs)

    _common.finish = finish
    try:
        metrics = run_glue.main(argv)
    finally:
        _common.finish = original
    updates_selectable = captured["updates_total"] - captured["steps"] * captured["dense_entries"]
    return {
        "metrics": _numbers(metrics),
        "unmasked": metrics.get("id3_unmasked"),
        "budget_entries": metrics.get("id3_budget"),
        "selectable": metrics.get("id3_selectable"),
        "dense_entries": captured["dense_entries"],
        "steps": captured["steps"],
        "updates_total": captured["updates_total"],
        "updates_selectable": updates_selectable,
        "skipped_steps": captured["skipped_steps"],
        "changed_entries": captured["changed_entries"],
        "loss_curve": captured["loss_curve"],
        "argv": argv,
    }


def execute_official(
    run: Run, protocol: Protocol, ctx: Context, output_dir: str, dev: bool = False, device: str = "cpu"
) -> dict:
    """The official ID3 optimizer (selective-optimizers v0.4, verbatim) in a plain Trainer.

    Same data, tokenization, collator, schedule and TrainingArguments as the engine runs; the new head goes
    in a `choose_all` group with the budget raised by its size, so it is trained densely outside the budget
    like everywhere else. The package's step counter is left as shipped (it never advances), so the
    recorded `unmasked` shows its overshoot against the budget.
    """
    import _common
    import numpy as np
    import run_glue
    import torch
    from selective_optimizers.wrap import get_selective_optimizer
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, set_seed

    from id3_callback.data import GLUE_TASKS, load_glue
    from id3_callback.metrics import load_metric

    train_file, eval_file, dev_file = run_files(run, dev)
    argv = glue_argv(run, protocol, train_file, eval_file, output_dir, ctx, device)
    model_args, data_args, lora_args, _log_args, id3_config, training_args = _common.parse_args(
        run_glue.ARGUMENT_TYPES, argv
    )
    set_seed(training_args.seed)
    task = GLUE_TASKS[run.task]
    raw = load_glue(run.task, train_file=train_file, validation_file=eval_file)
    tokenizer = _common.load_tokenizer("minilm")
    model = run_glue.build_model(
        model_args, data_args, lora_args, id3_config
    )  # sets id3_config.dense: the head
    tokenize = run_glue.tokenize_function(
        tokenizer, task, min(protocol.max_seq_length, tokenizer.model_max_length)
    )

    def prepare(ds, limit=None):
        if limit is not None and limit < len(ds):
            ds = ds.select(range(limit))
        return ds.map(tokenize, batched=True, remove_columns=[c for c in ds.column_names if c != "label"])

    train_ds = prepare(raw["train"])
    eval_ds = prepare(raw["validation"], protocol.max_eval_samples)
    head = [p for n, p in model.named_parameters() if re.search(id3_config.dense, n)]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    head_entries = sum(p.numel() for p in head)
    budget = ctx.budget_count(run.budget)
    cls = get_selective_optimizer(torch.optim.AdamW, "id3")
    optimizer = cls(
        [{"params": body}, {"params": head, "choose_all": True}],
        lr=run.lr,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        weight_decay=0.0,
        budget=budget + head_entries,
        max_steps=protocol.steps,
        eps=run.eps,
        exp=run.exp,
        verify=False,
    )
    all_params = [p for p in model.parameters() if p.requires_grad]

    class Counter(TrainerCallback):
        """Fills missing gradients (the official step dereferences every .grad) and sums the set sizes."""

        steps, updates = 0, 0

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            for p in all_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.steps += 1
            self.updates += int(optimizer.get_budget_used()) - head_entries

    counter = Counter()
    metric = load_metric("glue", task.metric_config)

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return metric.compute(predictions=np.argmax(logits, -1), references=pred.label_ids)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        optimizers=(optimizer, None),
        callbacks=[counter],
    )
    metrics = dict(trainer.train().metrics)
    metrics.update(trainer.evaluate())
    if dev_file is not None:
        metrics.update(evaluate_dev(trainer, run.task, dev_file, protocol))
    unmasked = int(optimizer.get_budget_used()) - head_entries
    return {
        "metrics": _numbers(metrics),
        "unmasked": unmasked,
        "budget_entries": budget,
        "overshoot": unmasked - budget,
        "selectable": sum(p.numel() for p in body),
        "dense_entries": head_entries,
        "steps": counter.steps,
        "updates_total": counter.updates + counter.steps * head_entries,
        "updates_selectable": counter.updates,
        "skipped_steps": 0,
        "changed_entries": ctx.changed_entries(model),
        "loss_curve": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "argv": argv,
    }


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def execute(run: Run, protocol: Protocol, ctx: Context, dev: bool = False, device: str = "cpu") -> dict:
    """Run one configuration and return its record (status 'error' with the message if it failed).

    `dev=True` (study v2): also score the dev set; the record gets `dev_score` and `dev_majority`, and
    `score` stays the held-out one the learning rate is chosen by."""

    record = asdict(run)
    record.update(
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        protocol_settings=asdict(protocol),
        versions=ctx.versions,
        host=ctx.host,
    )
    output_dir = tempfile.mkdtemp(prefix="id3-study-run-")
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner = execute_official if ALL_METHODS[run.method].engine_method is None else execute_engine
            out = runner(run, protocol, ctx, output_dir, dev, device)
        record.update(out)
        record["score"] = task_score(run.task, out["metrics"])
        if dev:
            record["dev_score"] = task_score(run.task, out["metrics"], "dev")
            record["dev_majority"] = out["metrics"].get("dev_majority")
        record["status"] = "ok" if record["score"] is not None else "error"
        record["warnings"] = sorted({str(w.message)[:200] for w in caught if _worth_keeping(w)})
        if record["score"] is None:
            record["error"] = f"no score in metrics {sorted(out['metrics'])}"
    except Exception as err:  # one failed run must not stop a multi-hour study; the record says why
        record.update(status="error", error=f"{type(err).__name__}: {err}"[:2000], score=None)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
        gc.collect()
    record["runtime_s"] = round(time.perf_counter() - t0, 2)
    record["rss_mb"] = _rss_mb()
    record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    return record


def _worth_keeping(w: warnings.WarningMessage) -> bool:
    text = str(w.message)
    return issubclass(w.category, UserWarning) and not text.startswith(("Some weights", "`resume_download`"))


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


# ------------------------------------------------------------------------------------------------ driver
def expected_seconds(records: list[dict], method: str, protocol: Protocol, default: float = 90.0) -> float:
    """The longest of the method's last 5 run times; for a method not run yet, of any method's last 5."""
    mine = [r for r in records if r.get("protocol") == protocol.name and r.get("runtime_s")]
    times = [r["runtime_s"] for r in mine if r.get("method") == method] or [r["runtime_s"] for r in mine]
    return max(times[-5:]) if times else default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--phase", choices=("lr", "main", "sensitivity", "all"), default="all")
    p.add_argument(
        "--results", type=Path, default=DEFAULT_RESULTS, help="JSONL file, appended to (default: %(default)s)"
    )
    p.add_argument(
        "--max-minutes", type=float, default=None, help="stop cleanly before a run that would end later"
    )
    p.add_argument(
        "--steps", type=int, default=Protocol.steps, help="optimizer steps per run (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=Protocol.batch_size)
    p.add_argument("--max-seq-length", type=int, default=Protocol.max_seq_length)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    p.add_argument("--tasks", default=",".join(TASKS), help="main phase: comma-separated tasks")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="main phase: comma-separated seeds")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--official-site", default="/tmp/so-site", help="folder holding selective_optimizers")
    p.add_argument(
        "--smoke", action="store_true", help="5 steps, 32 eval rows, one lr per method, seed 0 on rte"
    )
    p.add_argument("--retry-errors", action="store_true", help="rerun runs recorded with status 'error'")
    p.add_argument(
        "--max-rss-gb", type=float, default=8.0, help="re-exec the driver when memory grows past this"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and progress, run nothing")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    args.tasks = [t for t in args.tasks.split(",") if t]
    if sorted(set(args.tasks) - set(TASKS)):
        p.error(f"tasks must be among {TASKS}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.smoke:
        args.tasks = args.tasks if args.tasks != list(TASKS) else ["rte"]
        args.seeds = [0]
    return args


def make_protocol(args: argparse.Namespace) -> Protocol:
    if args.smoke:
        return Protocol(steps=5, batch_size=8, max_seq_length=64, max_eval_samples=32, fisher_samples=16)
    return Protocol(steps=args.steps, batch_size=args.batch_size, max_seq_length=args.max_seq_length)


def phase_runs(
    phase: str, args, protocol: Protocol, records: list[dict], methods: list[str]
) -> list[Run] | str:
    """The runs of one phase for `methods`, or a message saying why the phase cannot be planned yet."""
    if phase == "lr":
        return lr_plan(protocol, methods, args.smoke)
    if phase == "sensitivity":
        methods = ["id3"]
    lrs = chosen_lrs(records, protocol.name, methods)
    need = set(lr_plan(protocol, methods, args.smoke))
    missing = sorted({r.method for r in need if r.key() not in done_keys(records)})
    if missing:
        return f"the lr phase is not finished for {missing}: run --phase lr first"
    failed = sorted(set(methods) - set(lrs))
    if failed:
        print(f"[study] every lr run failed for {failed}: they are left out of the {phase} phase", flush=True)
    if phase == "main":
        return main_plan(protocol, lrs, methods, args.tasks, args.seeds)
    if "id3" not in lrs:
        return "no learning rate chosen for id3 (its lr runs failed?)"
    return sensitivity_plan(protocol, lrs["id3"], args.smoke)


def stages(phase: str, methods: list[str]) -> list[tuple[str, list[str]]]:
    """(phase, methods) in running order: slow methods (repeat-S) come after everything else.

    Example:
        >>> [p for p, _ in stages("all", list(METHODS))]
        ['lr', 'main', 'sensitivity', 'lr', 'main']
    """
    fast = [m for m in methods if not METHODS[m].slow]
    slow = [m for m in methods if METHODS[m].slow]
    order = {"all": ["lr", "main", "sensitivity"], "lr": ["lr"], "main": ["main"]}.get(phase, [phase])
    out = [(p, fast if p != "sensitivity" else ["id3"]) for p in order if p == "sensitivity" or fast]
    if slow:
        out += [(p, slow) for p in order if p != "sensitivity"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    # This checkout's package and scripts, whatever `pip install -e` points at now: an editable install moved
    # to another clone (and that clone deleted) once turned nine runs into 'error' records.
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    # The deadline survives a memory re-exec through the environment.
    if "ID3_STUDY_DEADLINE" not in os.environ and args.max_minutes is not None:
        os.environ["ID3_STUDY_DEADLINE"] = str(time.time() + 60 * args.max_minutes)
    deadline = float(os.environ.get("ID3_STUDY_DEADLINE", "inf"))
    protocol = make_protocol(args)
    plan = stages(args.phase, args.methods)
    records = load_results(args.results)
    print(f"[study] protocol {protocol.name}; results {args.results} ({len(records)} records)", flush=True)
    if args.dry_run:
        for phase, methods in plan:
            runs = phase_runs(phase, args, protocol, records, methods)
            if isinstance(runs, str):
                print(f"[study] {phase} {methods}: {runs}")
                continue
            done = done_keys(records)
            print(f"[study] {phase} {methods}: {sum(r.key() in done for r in runs)}/{len(runs)} done")
        return 0
    try:  # a broken install would otherwise turn every planned run into an 'error' record
        import id3_callback  # noqa: F401
    except ImportError as err:
        print(f"[study] cannot import id3_callback ({err}): run `pip install -e .` first", flush=True)
        return 2
    ctx = Context(protocol, args.official_site)
    if not ctx.official_ok and "official-id3" in args.methods:
        print(f"[study] selective_optimizers is not importable from {args.official_site}: skipping official-id3",
              flush=True)  # fmt: skip
        args.methods = [m for m in args.methods if m != "official-id3"]
        plan = stages(args.phase, args.methods)
    for phase, methods in plan:
        records = load_results(args.results)
        runs = phase_runs(phase, args, protocol, records, methods)
        if isinstance(runs, str):
            print(f"[study] {phase} {methods}: {runs}", flush=True)
            # Under --phase all, slow methods whose lr runs were cut by the deadline are skipped, not failed;
            # an explicit --phase main that cannot run fails (run_two_workers.sh waits on that status).
            if args.phase != "all" or any(not METHODS[m].slow for m in methods):
                return 1
            continue
        done = done_keys(records, args.retry_errors)
        todo = [r for r in runs if r.key() not in done]
        print(
            f"[study] phase {phase}: {len(runs) - len(todo)}/{len(runs)} done, {len(todo)} to run", flush=True
        )
        for i, run in enumerate(todo):
            if time.time() + expected_seconds(records, run.method, protocol) > deadline:
                print(f"[study] time limit: stopping before {run.key()}", flush=True)
                return 0
            print(f"[study] {phase} {i + 1}/{len(todo)}: {run.task} {run.method} budget={run.budget} "
                  f"seed={run.seed} lr={run.lr:g} eps={run.eps:g} exp={run.exp:g} lora={run.lora}", flush=True)  # fmt: skip
            record = execute(run, protocol, ctx)
            append_result(args.results, record)
            records.append(record)
            print(f"[study]   -> {record['status']} score={record.get('score')} unmasked={record.get('unmasked')} "
                  f"{record['runtime_s']:.0f}s rss={record['rss_mb']}MB {record.get('error', '')}", flush=True)  # fmt: skip
            if record["rss_mb"] > 1024 * args.max_rss_gb:
                print("[study] memory grew past --max-rss-gb: restarting the driver", flush=True)
                sys.stdout.flush()
                os.execv(sys.executable, [sys.executable, *sys.argv])
    print("[study] all planned runs of the requested phases are done", flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
