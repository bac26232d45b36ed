#!/usr/bin/env python
"""Where the bounded path's backward time goes: timers around `bounded.py`'s functions, beside the floors.

    python benchmarks/profile_bounded.py      # writes benchmarks/results/profile_bounded.json + .md

The same setting and variants as `bench_step.py` (MiniLM 16 x 64, SST-2, mid-schedule, 2 threads; variants
interleaved step by step). For the bounded variants it sums, per step, the wall time inside
`_BoundedLinear.backward` (dX, the bias gradient and what follows), `BoundedGrads.on_backward` (the scoring:
GEMM rows or the bound, and the unmasked entries' gradients), `live_tokens`, `_dense_rows` and `push_block`
(nested: a function's time includes its callees'), then reports medians. The timers add a few microseconds
per call; compare the step columns with `bench_step.py` runs, not with these.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys

import torch

sys.path[:0] = [
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
]

import bench_step  # noqa: E402
import benchutil  # noqa: E402

from id3_callback import bounded as bounded_mod  # noqa: E402
from id3_callback import bounded_tied  # noqa: E402

TIMED = (
    "live_tokens",
    "_dense_rows",
    "push_block",
    "bounded_weight_grad",
    "unmasked_products",
    "box_products",
    "gathered_products",
    "group_norms",
    "_block_hits",
    "sampled_products",
)
# bench_step's timers (ms per key, summed until `take()`), around bounded.py's functions instead of the engine's
timers = bench_step.StageTimers()


def install() -> None:
    timed = timers.timed
    for name in TIMED:
        setattr(bounded_mod, name, timed(name, getattr(bounded_mod, name)))
    grads = bounded_mod.BoundedGrads
    grads.on_backward = timed("on_backward", grads.on_backward)
    grads.certify = timed("certify", grads.certify)
    function = bounded_mod._BoundedLinear
    function.backward = staticmethod(timed("BoundedLinear.backward", function.backward))
    tied = bounded_tied.TiedOutputRows  # a tied output layer's token rows (SmolLM2)
    tied.on_head_backward = timed("tied.on_head_backward", tied.on_head_backward)
    tied.finish = timed("tied.finish", tied.finish)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    parser.add_argument("--variants", default="full,floor,floor_rest,id3_bounded,id3_bounded_keep,lora")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--warmup", type=int, default=6, help="untimed steps: past the branch probes (bounded_costs)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(benchutil.RESULTS, "profile_bounded.json"))
    args = parser.parse_args(argv)
    batch, seq = (16, 64) if args.model == "minilm" else (2, 256)  # bench_step's settings
    setting = argparse.Namespace(
        model=args.model, device="cpu", threads=args.threads, batch=batch, seq=seq, budget=0.0017,
        total_steps=1000, lr=1e-4, variants=args.variants,
    )  # fmt: skip
    torch.set_num_threads(args.threads)
    count = args.warmup + args.steps + 1
    if args.model == "minilm":
        batches = benchutil.sst2_batches(benchutil.minilm_tokenizer(), count, batch, seq)
    else:
        batches = benchutil.xsum_batches(benchutil.smollm()[1], count, batch, seq)
    variants = bench_step.build_variants(setting, batches[0])
    install()
    rows: dict[str, list[dict]] = collections.defaultdict(list)
    for i, batch in enumerate(batches[1:]):
        for v in variants[i % len(variants) :] + variants[: i % len(variants)]:
            timers.take()
            times = v.step(batch)
            parts = timers.take()
            if i >= args.warmup:
                rows[v.name].append({**times, **parts})
    result = {
        "benchmark": "profile_bounded",
        "setting": vars(args),
        "load": os.getloadavg()[0],
        "variants": {},
    }
    full = statistics.median(r["step"] for r in rows["full"]) if "full" in rows else None
    for name, records in rows.items():
        keys = sorted({k for r in records for k in r})
        row = {k: statistics.median(r.get(k, 0.0) for r in records) for k in keys}
        if full:
            row["x_full"] = row["step"] / full
        result["variants"][name] = row
    return benchutil.save_result(result, args.out, markdown)


def markdown(result: dict) -> str:
    columns = ["step", "fwd_bwd", "BoundedLinear.backward", "on_backward", "live_tokens", "_dense_rows"]
    columns += ["push_block", "bounded_weight_grad", "unmasked_products", "box_products", "gathered_products"]
    columns += ["group_norms", "_block_hits"]
    columns += ["sampled_products", "certify", "tied.on_head_backward", "tied.finish"]
    lines = [
        f"Bounded path, where the backward time goes ({result['setting'].get('model', 'minilm')}, medians in ms, load "
        f"{result['load']:.1f}; nested: a column includes the ones to its right that it calls).",
        "",
        "| variant | x full (of medians) | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for name, row in result["variants"].items():
        cells = [f"{row[c]:.1f}" if c in row else "" for c in columns]
        ratio = f"{row['x_full']:.2f}" if "x_full" in row else ""
        lines.append(f"| {name} | {ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
