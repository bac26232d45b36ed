"""How much of a bounded ID3 step each native kernel takes: timers around `native`'s calls, per step.

`bench_step.py`'s `id3_bounded` variant (the default bounded path, its branch per layer measured in the
first steps) trains past its probe steps, then each native kernel call is timed for the measured steps. It
answers "where do the bounded path's one-thread passes go" (docs/performance.md, issue 17), which a
whole-step A/B cannot resolve on a noisy machine.

Example:
    python benchmarks/bench_native_share.py --model smollm2   # benchmarks/results/native_share_smollm2.json
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch

sys.path[:0] = [
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
]
import bench_step  # noqa: E402
import benchutil  # noqa: E402

from id3_callback import native  # noqa: E402

KERNELS = (
    "bound_hits",
    "group_square_sums",
    "live_rows",
    "pair_dots",
    "gathered_dots",
    "gather_columns",
    "score_block",
    "index_set",
)
SIZES = {"minilm": (16, 64), "smollm2": (2, 256)}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    batch, seq = SIZES[args.model]
    count = args.warmup + args.steps + 1
    if args.model == "minilm":
        batches = benchutil.sst2_batches(benchutil.minilm_tokenizer(), count, batch, seq)
    else:
        batches = benchutil.xsum_batches(benchutil.smollm()[1], count, batch, seq)
    setting = argparse.Namespace(
        model=args.model, device="cpu", threads=args.threads, batch=batch, seq=seq, budget=args.budget,
        total_steps=args.total_steps, lr=1e-4, variants="id3_bounded",
    )  # fmt: skip
    variant = bench_step.build_variants(setting, batches[0])[0]
    for b in batches[1 : 1 + args.warmup]:
        variant.step(b)
    spent: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for name in KERNELS:
        kernel = getattr(native, name)

        def timed(*a, _kernel=kernel, _name=name, **k):
            start = time.perf_counter()
            out = _kernel(*a, **k)
            spent[_name] += time.perf_counter() - start
            calls[_name] += 1
            return out

        setattr(native, name, timed)
    per_step = collections.defaultdict(list)
    for b in batches[1 + args.warmup :]:
        spent.clear()
        start = time.perf_counter()
        variant.step(b)
        per_step["step"].append((time.perf_counter() - start) * 1e3)
        for name in KERNELS:
            per_step[name].append(spent[name] * 1e3)
    medians = {name: statistics.median(values) for name, values in per_step.items()}
    return {
        "benchmark": "native_share",
        "model": args.model,
        "batch": batch,
        "seq": seq,
        "threads": args.threads,
        "steps": args.steps,
        "machine": benchutil.machine(),
        "median_ms": medians,
        "calls_per_step": {name: calls[name] / args.steps for name in KERNELS},
        "per_step_ms": dict(per_step),
    }


def markdown(result: dict) -> str:
    m = result["median_ms"]
    lines = [
        f"Native kernels in a bounded ID3 step, {result['model']} {result['batch']} x {result['seq']}, "
        f"{result['threads']} threads, median of {result['steps']} steps ({result['machine']['date']}, "
        f"{result['machine']['cpu']}, load {result['machine']['load_1min']:.1f}).",
        "",
        "| kernel | ms per step | share of the step | calls per step |",
        "|---|---|---|---|",
    ]
    for name in KERNELS:
        lines.append(
            f"| {name} | {m[name]:.1f} | {m[name] / m['step']:.1%} | {result['calls_per_step'][name]:.0f} |"
        )
    lines.append(f"| the whole step | {m['step']:.0f} | 100% | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=6, help="steps before timing (past the branch probes)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.0017)
    parser.add_argument("--total-steps", type=int, default=1000)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/native_share_<model>.json")
    args = parser.parse_args(argv)
    if native.library() is None:
        raise SystemExit(f"native kernels unavailable: {native.status()}")
    out = args.out or str(benchutil.RESULTS / f"native_share_{args.model}.json")
    return benchutil.save_result(run(args), out, markdown)


if __name__ == "__main__":
    main()
