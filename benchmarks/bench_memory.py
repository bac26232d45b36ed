#!/usr/bin/env python
"""Peak memory of training steps: full fine-tuning, LoRA, ID3 (standard and low-memory), official ID3.

    python benchmarks/bench_memory.py          # writes benchmarks/results/memory.json + memory.md

Setting (the issue's): SmolLM2-135M-Instruct dequantized to fp32 from the packaged GGUF, causal-LM
batches of 2 x 256 tokens of real XSum articles, CPU, 2 threads. Each variant runs in its own fresh
process, one after the other: load the model, build the optimizer (ID3: half the budget already
unmasked, as mid-training, the set chosen beforehand in a process of its own), hand freed heap back to the OS, restart the kernel's peak-RSS counter
(`/proc/self/clear_refs`), then train a few steps and read the peak (VmHWM). That peak is what the
training steps need on top of nothing: weights, activations, gradients, optimizer state, temporaries,
and the Python/torch runtime. The peak of the whole process (`ru_maxrss`, including loading) is reported
too. On a GPU the script reports `torch.cuda.max_memory_allocated` over the same steps instead.

The official ID3 (`selective-optimizers` 0.4) is measured when importable: `pip install --no-deps
--target /tmp/so-site selective-optimizers==0.4` and PYTHONPATH=/tmp/so-site.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
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
from id3_callback.recompute import PointwiseRecompute  # noqa: E402

VARIANTS = (
    "full",
    "lora",
    "lora_recompute",
    "id3",
    "id3_low_memory",
    "id3_low_memory_keep",
    "id3_bounded",
    "id3_bounded_keep",
    "grad_floor",
    "official",
)
# The variants that train with ID3Engine, from the mid-training set the probe process writes.
ID3_VARIANTS = ("id3", "id3_low_memory", "id3_low_memory_keep", "id3_bounded", "id3_bounded_keep")


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    model, tokenizer = benchutil.smollm()
    model.config.use_cache = False
    batches = benchutil.xsum_batches(tokenizer, args.steps + 1, args.batch, args.seq)
    if cuda:
        model.cuda()
        batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
    model.train()
    if args.checkpointing:  # every variant recomputes each layer's activations in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total = sum(p.numel() for p in model.parameters())
    budget = max(1, round(args.budget * total))
    engine = None
    name = args.child
    if name == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    elif name in ("lora", "lora_recompute"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, config)
        if name == "lora_recompute":  # LoRA with the recomputation ID3's low-memory mode uses, for comparison
            PointwiseRecompute(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, fused=True)
    elif name == "probe":  # not a variant: the mid-training set, chosen in its own process (see `parent`)
        probe = ID3Engine(model, ID3Config(budget=args.budget))
        probe.start(args.total_steps)
        model(**batches[0]).loss.backward()
        _, index = probe.scan.top_by_gradient(
            probe.schedule.target(args.total_steps // 2), probe.method.score_fn()
        )
        probe.add_global(index)
        torch.save(probe.unmasked.state_dict(), args.mask_file)
        return {"variant": "probe", "unmasked": len(probe.unmasked)}
    elif name in ID3_VARIANTS:
        # Mid-training set: half the budget, chosen by D3 on a warm-up batch. It comes from a file written
        # by a separate process, so this one, like every other variant's, has run no backward before the
        # measured steps (a warm-up backward leaves its own heap layout behind).
        # id3_low_memory_keep: the mode without its default pointwise recomputation (every activation kept)
        # id3_bounded: the standard mode without dense weight gradients (ID3Config.weight_grads), by default
        # with pointwise recomputation; id3_bounded_keep: without it
        config = ID3Config(
            budget=args.budget,
            low_memory=name not in ("id3", "id3_bounded", "id3_bounded_keep"),
            recompute_pointwise=False if name.endswith("_keep") else None,
            weight_grads="bounded" if name.startswith("id3_bounded") else "dense",
        )
        engine = ID3Engine(model, config)
        engine.start(args.total_steps)
        engine.unmasked.load_state_dict(torch.load(args.mask_file))
        engine.steps_done = args.total_steps // 2
        opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=args.lr)
    elif name == "grad_floor":
        # The floor of any method that builds every weight's gradient tensor and keeps every activation
        # (ID3's standard mode, FISH): backward computes each gradient and a hook drops it at once; no
        # scoring, no optimizer. What remains is activations saved for the weight gradients plus autograd's
        # own transients, including a tied table's gradient, which lives through the whole backward. The
        # low-memory mode goes below it two ways: it never builds that table's gradient whole
        # (`TiedOutputStreams`), and it recomputes the cheapest saved activations (`PointwiseRecompute`).
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        opt = None
    elif name == "official":
        if not official_available():
            return {"skipped": "selective_optimizers not importable"}
        opt = make_official_id3(model, budget=budget, total_steps=args.total_steps, lr=args.lr)
    else:
        raise SystemExit(f"unknown variant {name!r}")

    benchutil.trim_heap()
    baseline = benchutil.rss_mb()
    reset_ok = benchutil.reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated() / 2**20
    t0 = time.perf_counter()
    losses = []
    for batch in batches[1:]:
        loss = model(**batch).loss
        loss.backward()
        if engine is not None:
            engine.step()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    out = {
        "variant": args.child,
        "peak_rss_mb": benchutil.peak_rss_mb(),
        "rss_after_setup_mb": baseline,
        "peak_reset_ok": reset_ok,
        "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds_per_step": seconds / args.steps,
        "losses": losses,
        "trainable_or_budget": budget if engine is not None or name == "official" else None,
    }
    if name == "lora":
        out["trainable_or_budget"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if engine is not None:
        out["unmasked"] = len(engine.unmasked)
        out["optimizer_state_mb"] = opt.state_bytes() / 2**20
        out["low_memory_active"] = engine.low_memory_active
        out["recompute_active"] = engine.recompute_active
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_after_setup_mb"] = cuda_base
    return out


def add_ratios(results: dict) -> None:
    """Each variant's peak against LoRA's (a ratio) and against the gradient floor's (MiB).

    With repeated rounds, the ratio is the median of the per-round ratios (variants side by side).
    """
    lora = results.get("lora", {})
    floor = results.get("grad_floor", {}).get("peak_rss_mb")
    for row in results.values():
        if lora.get("peak_rss_mb") and "peak_rss_mb" in row:
            row["vs_lora"] = row["peak_rss_mb"] / lora["peak_rss_mb"]
            runs, lora_runs = row.get("peak_rss_runs"), lora.get("peak_rss_runs")
            if runs and lora_runs and len(runs) == len(lora_runs):
                row["vs_lora_runs"] = [a / b for a, b in zip(runs, lora_runs)]
                row["vs_lora"] = statistics.median(row["vs_lora_runs"])
        if floor and "peak_rss_mb" in row:
            row["vs_grad_floor_mb"] = round(row["peak_rss_mb"] - floor)


def parent(args) -> dict:
    names = args.variants.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        args.mask_file = os.path.join(tmp, "mid_training_set.pt")
        if set(ID3_VARIANTS) & set(names):
            probe = measure("probe", args)
            if "error" in probe:
                raise SystemExit(f"choosing the mid-training set failed: {probe['error']}")
        for round_ in range(args.repeats):  # rounds rotate the order, so no variant always runs first
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                runs[name].append(measure(name, args))
    results = {}
    for name in names:
        ok = [r for r in runs[name] if "peak_rss_mb" in r]
        if len(ok) < len(runs[name]) or args.repeats == 1:
            results[name] = runs[name][0] if not ok else ok[0]
            continue
        peaks = [r["peak_rss_mb"] for r in ok]
        row = dict(ok[0])
        row["peak_rss_runs"] = peaks
        row["peak_rss_mb"] = statistics.median(peaks)
        row["process_max_rss_mb"] = statistics.median(r["process_max_rss_mb"] for r in ok)
        row["rss_after_setup_mb"] = statistics.median(r["rss_after_setup_mb"] for r in ok)
        results[name] = row
    add_ratios(results)
    setting = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
        "data": "XSum train articles, causal LM",
        "batch": args.batch,
        "seq": args.seq,
        "budget_fraction": args.budget,
        "total_steps": args.total_steps,
        "steps": args.steps,
        "threads": args.threads,
        "malloc_mmap_threshold": args.mmap_threshold or "glibc default (dynamic)",
        "gradient_checkpointing": args.checkpointing,
    }
    if args.repeats > 1:
        setting["repeats"] = args.repeats
    return {"benchmark": "memory", "setting": setting, "machine": benchutil.machine(), "variants": results}


def measure(name: str, args) -> dict:
    """One fresh child process for `name`: its result row (or an error row)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name]
    cmd += ["--threads", str(args.threads), "--steps", str(args.steps), "--batch", str(args.batch)]
    cmd += ["--device", args.device]
    cmd += ["--seq", str(args.seq), "--budget", str(args.budget), "--total-steps", str(args.total_steps)]
    cmd += ["--checkpointing"] if args.checkpointing else []
    cmd += ["--mask-file", args.mask_file]
    print(f"[memory] {name} ...", flush=True)
    env = dict(os.environ)
    if args.mmap_threshold:  # fixed glibc threshold: freed blocks go back to the OS, RSS = live memory
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    row = json.loads(line[len("RESULT ") :])
    row["measured"] = benchutil.machine()["date"]
    print(f"[memory] {name}: {json.dumps(row)}", flush=True)
    return row


def markdown(result: dict) -> str:
    rows = []
    for name, r in result["variants"].items():
        if "peak_rss_mb" not in r:
            rows.append([name, None, None, None, None, None, r.get("skipped") or r.get("error")])
            continue
        rows.append(
            [
                name,
                r["peak_rss_mb"],
                r.get("vs_lora"),
                r.get("vs_grad_floor_mb"),
                r["rss_after_setup_mb"],
                r["process_max_rss_mb"],
                f"{r['seconds_per_step']:.1f} s/step"
                + (
                    f"; runs {' / '.join(f'{x:,.0f}' for x in r['peak_rss_runs'])}"
                    if "peak_rss_runs" in r
                    else ""
                ),
            ]
        )
    s = result["setting"]
    text = (
        f"Peak memory of {s['steps']} training steps, {s['model']}, batch {s['batch']} x {s['seq']}, "
        f"budget {100 * s['budget_fraction']:.2f}%, {s['threads']} thread{'s' * (s['threads'] != 1)}, one fresh process per variant "
        f"({result['machine']['date']}, {result['machine']['cpu']}).\n\n"
    )
    if s.get("repeats"):
        text += (
            f"{s['repeats']} rounds of every variant, order rotating: peak = median of the rounds, x LoRA = median "
            "of the per-round ratios.\n\n"
        )
    if s.get("gradient_checkpointing"):
        text += "Gradient checkpointing (non-reentrant) for every variant.\n\n"
    if s.get("malloc_mmap_threshold") != "glibc default (dynamic)":
        text += f"MALLOC_MMAP_THRESHOLD_={s['malloc_mmap_threshold']} for every variant.\n\n"
    text += benchutil.markdown_table(
        [
            "variant",
            "peak RSS MiB (training)",
            "x LoRA",
            "- grad_floor MiB",
            "RSS after setup MiB",
            "process max RSS MiB",
            "note",
        ],
        rows,
    )
    if result.get("merged"):
        text += (
            "\nRows measured at different times: "
            + ", ".join(f"{n} {r['measured']}" for n, r in result["variants"].items() if r.get("measured"))
            + ".\n"
        )
    if "grad_floor" in result["variants"]:
        text += (
            "\ngrad_floor: every weight's gradient is computed and dropped at once by a hook (no scoring, no "
            "optimizer), every activation kept: the least any method that builds every gradient tensor needs "
            "without recomputing. ID3's low-memory mode goes below it: it scores a tied table's gradient in "
            "blocks and never builds it whole, and by default stores the cheapest saved activations as one-op "
            "recipes (`recompute_pointwise`; `_keep` rows: without). lora_recompute: LoRA with the same "
            "recipes.\n"
        )
    if any("cuda_peak_mb" in r for r in result["variants"].values()):
        text += "\nGPU: " + ", ".join(
            f"{n} {r['cuda_peak_mb']:.0f} MiB" for n, r in result["variants"].items() if "cuda_peak_mb" in r
        )
    return text


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mask-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda: max_memory_allocated"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--budget", type=float, default=0.0017)
    parser.add_argument("--total-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="set MALLOC_MMAP_THRESHOLD_ for every variant (e.g. 131072): glibc then returns freed blocks at "
        "once instead of keeping them in the heap, so peak RSS tracks live memory (default: glibc's own)",
    )
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="gradient checkpointing (non-reentrant) for every variant",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of every variant (order rotating); peaks and ratios to LoRA are medians over rounds",
    )
    parser.add_argument("--out", default=str(benchutil.RESULTS / "memory.json"))
    parser.add_argument(
        "--merge",
        action="store_true",
        help="remeasure only --variants and keep the other rows of --out (same setting required)",
    )
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return None
    result = parent(args)
    out = benchutil.Path(args.out)
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        if old.get("setting") != result["setting"]:
            raise SystemExit(f"--merge: {out} was measured with another setting: {old.get('setting')}")
        when = old.get("machine", {}).get("date")
        for row in old["variants"].values():
            row.setdefault("measured", when)
        rows = {**old["variants"], **result["variants"]}
        result["variants"] = {n: rows[n] for n in VARIANTS if n in rows}
        result["merged"] = True
        add_ratios(result["variants"])
    return benchutil.save_result(result, args.out, markdown)


if __name__ == "__main__":
    main()
