#!/usr/bin/env python
"""Step time, peak memory and selection cost on one device: what `benchmarks/device_check.sh` runs on a GPU.

    python benchmarks/bench_device.py --device cuda --out benchmarks/results/device   # on a GPU
    python benchmarks/bench_device.py --device cpu --dry-run --out /tmp/device         # tiny, < 1 min

Three parts, each written as JSON + Markdown under `--out`:

- `step`: one training step (forward, backward, ID3's `engine.step`, optimizer step, zero_grad) of full
  fine-tuning (AdamW), LoRA r=8 on q/v (AdamW), ID3 (SparseAdamW, row-sparse embedding gradients),
  ID3 low-memory mode and the official ID3 (`selective-optimizers` 0.4, when importable), on three
  models built from their configs with random weights (timing does not depend on the weights): MiniLM
  (BERT 6 x 384, a 2-way head; 32 x 128 tokens), SmolLM2-135M (Llama 30 x 576, bf16; 8 x 256) and a
  ~1.1B-parameter Llama (22 x 2048, bf16; 4 x 256). Random token batches. Every variant has its own
  copy of the model and sees the same batches; variants run interleaved step by step, order rotating,
  and ratios to full fine-tuning are taken per step, then the median. ID3 starts mid-schedule (half
  the budget unmasked, chosen by D3 on a warm-up batch). Budget 0.17%, T = 1000.
- `memory`: each (model, variant) in a fresh process: the peak of `torch.cuda.max_memory_allocated`
  over the measured steps (on CPU: peak RSS), and the memory held after setup.
- `selection`: one ID3 selection (`Scan.top_by_gradient`, k = B/T with B = 0.17% of N, half of B
  already unmasked) over N = 100M .. 2B random fp32 entries in tensors of 64M: time (median of 3) and
  extra memory (peak allocated minus allocated before), batched (`batched_topk`, CUDA's default) and
  streaming chunk by chunk, side by side.

`--dry-run` swaps in tiny models and sizes so the whole script runs on a CPU in well under a minute
(`tests/test_device_check.py` runs it), checking the code paths, not the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

# this checkout's id3_callback (and the helpers next to this file), whatever else is installed
sys.path[:0] = [
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
]

import benchutil  # noqa: E402
from official import make_official_id3, official_available  # noqa: E402

from id3_callback import ID3Config, ID3Engine, SparseAdamW  # noqa: E402
from id3_callback import selection as selection_mod  # noqa: E402

VARIANTS = ("full", "lora", "id3", "id3_low_memory", "official")
# name: (architecture, config, dtype, batch, seq); the dry run's tiny ones share the names' roles.
MODELS = {
    "minilm": (
        "bert",
        dict(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
        ),
        "float32",
        32,
        128,
    ),
    "smollm2_135m": (
        "llama",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
        ),
        "bfloat16",
        8,
        256,
    ),
    "llama_1b": (
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
        "bfloat16",
        4,
        256,
    ),
}
TINY = {
    "minilm": ("bert", dict(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48), "float32", 4, 16),
    "smollm2_135m": ("llama", dict(vocab_size=500, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True), "bfloat16", 2, 16),
    "llama_1b": ("llama", dict(vocab_size=800, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), "bfloat16", 2, 16),
}  # fmt: skip
SELECTION_SIZES = (100e6, 250e6, 500e6, 1e9, 2e9)
TINY_SELECTION_SIZES = (1e6, 4e6)
BUDGET, TOTAL_STEPS = 0.0017, 1000


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def build_model(spec, device: torch.device):
    """A model from its config, random weights, created on `device` directly (no CPU init of 1B weights)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    arch, config, dtype, _, _ = spec
    torch.manual_seed(0)
    with torch.device(device):
        if arch == "bert":
            model = BertForSequenceClassification(BertConfig(num_labels=2, **config))
        else:
            model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096, use_cache=False, **config))
    model.to(getattr(torch, dtype))
    model.config.use_cache = False
    return model.train()


def batches_for(spec, count: int, device: torch.device) -> list[dict]:
    arch, config, _, batch, seq = spec
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=g)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        b["labels"] = torch.randint(0, 2, (batch,), generator=g) if arch == "bert" else ids.clone()
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def make_variant(name: str, base, spec, warm_batch: dict, mask_state: dict | None):
    """(model, optimizer, engine or None) of one variant, or None when it cannot run here."""
    model = copy.deepcopy(base)
    total = sum(p.numel() for p in model.parameters())
    fused = next(model.parameters()).device.type == "cuda"
    if name == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=2e-5, fused=fused), None
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["query", "value"] if spec[0] == "bert" else ["q_proj", "v_proj"]
        task = "SEQ_CLS" if spec[0] == "bert" else "CAUSAL_LM"
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task))
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=2e-5, fused=fused), None
    if name in ("id3", "id3_low_memory"):
        engine = ID3Engine(model, ID3Config(budget=BUDGET, low_memory=name == "id3_low_memory"))
        engine.start(TOTAL_STEPS)
        engine.unmasked.load_state_dict(mask_state)
        engine.steps_done = TOTAL_STEPS // 2
        return model, SparseAdamW(engine.parameters(), engine.unmasked, lr=2e-5), engine
    if name == "official":
        if not official_available():
            return None
        return model, make_official_id3(model, round(BUDGET * total), TOTAL_STEPS, lr=2e-5), None
    raise SystemExit(f"unknown variant {name!r}")


def mid_training_set(base, warm_batch: dict) -> dict:
    """Half the budget, chosen by D3 on a warm-up batch: the set ID3 variants start from."""
    probe = copy.deepcopy(base)
    engine = ID3Engine(probe, ID3Config(budget=BUDGET))
    engine.start(TOTAL_STEPS)
    probe(**warm_batch).loss.backward()
    _, index = engine.scan.top_by_gradient(engine.schedule.target(TOTAL_STEPS // 2), engine.method.score_fn())
    engine.add_global(index)
    state = engine.unmasked.state_dict()
    del probe, engine
    return state


def one_step(model, opt, engine, batch, device) -> dict[str, float]:
    t0 = sync(device)
    model(**batch).loss.backward()
    t1 = sync(device)
    if engine is not None:
        engine.step()
    t2 = sync(device)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = sync(device)
    return {
        "step": (t3 - t0) * 1e3,
        "fwd_bwd": (t1 - t0) * 1e3,
        "engine": (t2 - t1) * 1e3,
        "optimizer": (t3 - t2) * 1e3,
    }


def step_part(args, models: dict, device: torch.device) -> dict:
    out = {}
    for model_name, spec in models.items():
        base = build_model(spec, device)
        batches = batches_for(spec, args.warmup + args.steps + 1, device)
        mask_state = mid_training_set(base, batches[0])
        variants, skipped = {}, {}
        for name in args.variants:
            made = make_variant(name, base, spec, batches[0], mask_state)
            if made is None:
                skipped[name] = (
                    "selective_optimizers not importable (pip install --no-deps selective-optimizers==0.4)"
                )
            else:
                variants[name] = made
        del base
        records: dict[str, list[dict]] = {n: [] for n in variants}
        names = list(variants)
        for i, batch in enumerate(batches[1:]):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                times = one_step(*variants[name], batch, device)
                if i >= args.warmup:
                    records[name].append(times)
        rows = {}
        for name, rec in records.items():
            row = {key: statistics.median(r[key] for r in rec) for key in rec[0]}
            if "full" in records:
                row["ratio_vs_full"] = statistics.median(
                    r["step"] / f["step"] for r, f in zip(rec, records["full"])
                )
            engine = variants[name][2]
            if engine is not None:
                row["selection_batched"] = engine.scan.batched()
                row["unmasked"] = len(engine.unmasked)
            rows[name] = row
        params = sum(p.numel() for p in variants[names[0]][0].parameters())
        out[model_name] = {
            "dtype": spec[2],
            "batch": spec[3],
            "seq": spec[4],
            "parameters": params,
            "variants": rows,
            "skipped": skipped,
        }
        print(
            f"[step] {model_name}: " + ", ".join(f"{n} {r['step']:.1f} ms" for n, r in rows.items()),
            flush=True,
        )
        del variants
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def memory_child(args, device: torch.device) -> dict:
    spec = (TINY if args.dry_run else MODELS)[args.model]
    base = build_model(spec, device)
    batches = batches_for(spec, args.memory_steps + 1, device)
    mask_state = mid_training_set(base, batches[0]) if args.variant.startswith("id3") else None
    made = make_variant(args.variant, base, spec, batches[0], mask_state)
    if made is None:
        return {"skipped": "selective_optimizers not importable"}
    del base
    model, opt, engine = made
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated() / 2**20
    else:
        benchutil.trim_heap()
        held = benchutil.rss_mb()
        benchutil.reset_peak_rss()
    for batch in batches[1:]:
        one_step(model, opt, engine, batch, device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else benchutil.peak_rss_mb()
    return {
        "peak_mb": peak,
        "after_setup_mb": held,
        "measure": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
    }


def memory_part(args, models: dict) -> dict:
    out = {}
    for model_name in models:
        rows = {}
        # The dry run checks the child's code path with two variants (each one a fresh process).
        for name in [v for v in args.variants if not args.dry_run or v in ("full", "id3_low_memory")]:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "memory", "--model", model_name]
            cmd += ["--variant", name, "--device", args.device, "--memory-steps", str(args.memory_steps)]
            cmd += ["--dry-run"] if args.dry_run else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows[name] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
                continue
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
            rows[name] = json.loads(line[len("RESULT ") :])
        if "peak_mb" in rows.get("full", {}):
            for row in rows.values():
                if "peak_mb" in row:
                    row["ratio_vs_full"] = row["peak_mb"] / rows["full"]["peak_mb"]
        out[model_name] = rows
        print(f"[memory] {model_name}: {json.dumps(rows)}", flush=True)
    return out


def selection_part(args, device: torch.device) -> dict:
    from functools import partial

    from torch import nn

    from id3_callback import d3_scores

    rows = []
    piece = 1 << (18 if args.dry_run else 26)
    for n in TINY_SELECTION_SIZES if args.dry_run else SELECTION_SIZES:
        n = int(n)
        g = torch.Generator(device=device).manual_seed(0)
        params = nn.ParameterList()
        for start in range(0, n, piece):
            size = min(piece, n - start)
            p = (
                nn.Parameter(torch.randn(size // 1024, 1024, generator=g, device=device) * 0.05)
                if size % 1024 == 0
                else nn.Parameter(torch.randn(size, generator=g, device=device) * 0.05)
            )
            p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
            params.append(p)
        engine = ID3Engine(params, ID3Config(budget=BUDGET))
        engine.start(TOTAL_STEPS)
        mid = TOTAL_STEPS // 2
        k = engine.schedule.target(mid + 1) - engine.schedule.target(mid)
        half = torch.randperm(n, generator=g, device=device)[: engine.budget // 2]
        engine.add_global(half)
        score = partial(d3_scores, eps=1e-3, exp=1.0)
        row = {"n": n, "k": k}
        chosen = {}
        for mode in ("always", "never"):
            selection_mod.BATCHED_SELECTION = mode
            times, extra = [], 0.0
            for _ in range(3):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                t0 = sync(device)
                _, index = engine.scan.top_by_gradient(k, score)
                times.append((sync(device) - t0) * 1e3)
                if device.type == "cuda":
                    extra = max(extra, (torch.cuda.max_memory_allocated() - before) / 2**20)
            chosen[mode] = index
            label = "batched" if mode == "always" else "streaming"
            row[f"{label}_ms"] = statistics.median(times)
            if device.type == "cuda":
                row[f"{label}_extra_mb"] = extra
        row["same_entries"] = bool(torch.equal(chosen["always"], chosen["never"]))
        selection_mod.BATCHED_SELECTION = "auto"
        rows.append(row)
        print(f"[selection] {json.dumps(row)}", flush=True)
        del params, engine, half
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "rows": rows,
        "extra_memory": "peak minus allocated before (CUDA only; on CPU see bench_scaling.py)",
    }


def markdown(result: dict) -> str:
    lines = [
        f"# Device check: {result['device']} ({result['machine'].get('gpu') or result['machine']['cpu']})",
        "",
    ]
    if result.get("dry_run"):
        lines += ["Dry run: tiny models and sizes, code paths only; the numbers mean nothing.", ""]
    for model, r in result.get("step", {}).items():
        lines += [
            f"## Step, {model} ({r['parameters'] / 1e6:.1f}M parameters, {r['dtype']}, {r['batch']} x {r['seq']})",
            "",
        ]
        table = [
            [n, v["step"], v["fwd_bwd"], v["engine"], v["optimizer"], v.get("ratio_vs_full")]
            for n, v in r["variants"].items()
        ]
        lines.append(
            benchutil.markdown_table(
                ["variant", "step ms", "fwd+bwd ms", "engine.step ms", "optimizer ms", "x full"], table
            )
        )
        lines += [f"- {n}: skipped, {why}" for n, why in r["skipped"].items()] + [""]
    for model, rows in result.get("memory", {}).items():
        lines += [f"## Peak memory, {model}", ""]
        table = [
            [
                n,
                v.get("peak_mb"),
                v.get("after_setup_mb"),
                v.get("ratio_vs_full"),
                v.get("skipped") or v.get("error"),
            ]
            for n, v in rows.items()
        ]
        lines += [
            benchutil.markdown_table(["variant", "peak MiB", "after setup MiB", "x full", "note"], table),
            "",
        ]
    if "selection" in result:
        lines += ["## One selection against N", ""]
        table = [
            [
                f"{r['n'] / 1e6:g}M",
                r["k"],
                r["batched_ms"],
                r.get("batched_extra_mb"),
                r["streaming_ms"],
                r.get("streaming_extra_mb"),
                r["same_entries"],
            ]
            for r in result["selection"]["rows"]
        ]
        lines += [
            benchutil.markdown_table(
                [
                    "N",
                    "k",
                    "batched ms",
                    "batched extra MiB",
                    "streaming ms",
                    "streaming extra MiB",
                    "same entries",
                ],
                table,
            ),
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny models and sizes (CPU, seconds)")
    parser.add_argument("--parts", default="step,memory,selection")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--memory-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(benchutil.RESULTS / "device"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:  # tiny models: a larger budget and a short schedule, so every step selects something
        global BUDGET, TOTAL_STEPS
        BUDGET, TOTAL_STEPS = 0.02, 20
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.steps = args.steps or (2 if args.dry_run else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    args.memory_steps = args.memory_steps or (1 if args.dry_run else 3)
    args.variants = args.variants.split(",")
    if args.child == "memory":
        print("RESULT " + json.dumps(memory_child(args, device)))
        return None
    models = {m: (TINY if args.dry_run else MODELS)[m] for m in args.models.split(",")}
    parts = args.parts.split(",")
    result = {
        "benchmark": "device",
        "device": args.device,
        "dry_run": args.dry_run,
        "machine": benchutil.machine(),
    }
    result["setting"] = {
        "budget_fraction": BUDGET,
        "total_steps": TOTAL_STEPS,
        "steps": args.steps,
        "warmup": args.warmup,
        "weights": "random, from configs",
        "data": "random tokens",
    }
    t0 = time.perf_counter()
    if "step" in parts:
        result["step"] = step_part(args, models, device)
        print(f"[device] step part done at {time.perf_counter() - t0:.0f} s", flush=True)
    if "memory" in parts:  # the dry run: one model (each variant is a fresh process)
        result["memory"] = memory_part(args, dict(list(models.items())[:1]) if args.dry_run else models)
    if "selection" in parts:
        result["selection"] = selection_part(args, device)
    result["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    return benchutil.save_result(result, os.path.join(args.out, "bench_device.json"), markdown)


if __name__ == "__main__":
    main()
