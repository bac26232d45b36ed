#!/usr/bin/env python
"""What pointwise recomputation costs in step time: ID3's low-memory mode on one model, steps alternating
between storing the cheapest saved activations as one-op recipes (the mode's default) and keeping them.

    python benchmarks/bench_recompute.py                  # SmolLM2-135M, 2 x 256: recompute.json + .md
    python benchmarks/bench_recompute.py --model minilm   # all-MiniLM-L6-v2, 16 x 64 SST-2

Both settings are the other benchmarks' (SmolLM2: the memory benchmark's; MiniLM: the step benchmark's),
budget 0.17%, 2 threads. Both modes run on the same model object in A/B/B/A order, so memory placement and
machine drift hit both alike; the ratio is the median of the per-pair ratios. Peak memory is measured by
`bench_memory.py` (one process per variant), not here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path[:0] = [
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
]

import benchutil  # noqa: E402

from id3_callback import ID3Config, ID3Engine, SparseAdamW  # noqa: E402
from id3_callback.recompute import PointwiseRecompute  # noqa: E402

MODELS = {
    "smollm": ("SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)", 2, 256),
    "minilm": ("all-MiniLM-L6-v2, SST-2", 16, 64),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.0017)
    parser.add_argument("--total-steps", type=int, default=1000)
    parser.add_argument(
        "--pairs", type=int, default=8, help="steps of each mode (after one warm-up step each)"
    )
    parser.add_argument("--out", default=None, help="default: benchmarks/results/recompute[_minilm].json")
    args = parser.parse_args(argv)
    label, batch, seq = MODELS[args.model]

    torch.set_num_threads(args.threads)
    if args.model == "smollm":
        model, tokenizer = benchutil.smollm()
        model.config.use_cache = False
        batches = benchutil.xsum_batches(tokenizer, args.pairs + 1, batch, seq)
    else:
        model = benchutil.minilm_classifier()
        batches = benchutil.sst2_batches(benchutil.minilm_tokenizer(), args.pairs + 1, batch, seq)
    model.train()
    engine = ID3Engine(model, ID3Config(budget=args.budget, low_memory=True))
    engine.start(args.total_steps)
    if not engine.recompute_active:
        raise SystemExit("pointwise recomputation did not turn on for this model: nothing to compare")
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=2e-5)

    def step(inputs: dict, recompute: bool) -> float:
        # The keep mode takes the recipes' hooks out for one step (a private handle: this is the A/B switch).
        if not recompute:
            engine._recompute.remove()
        t0 = time.perf_counter()
        model(**inputs).loss.backward()
        engine.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        if not recompute:
            engine._recompute = PointwiseRecompute(model)
        return seconds

    times: dict[str, list[float]] = {"recompute": [], "keep": []}
    for mode in times:  # warm-up, one step each
        step(batches[0], mode == "recompute")
    for i, inputs in enumerate(batches[1:]):
        for mode in ("recompute", "keep") if i % 2 == 0 else ("keep", "recompute"):
            times[mode].append(step(inputs, mode == "recompute"))
    ratios = [r / k for r, k in zip(times["recompute"], times["keep"])]
    result = {
        "benchmark": "recompute",
        "setting": {
            "model": label,
            "batch": batch,
            "seq": seq,
            "budget_fraction": args.budget,
            "threads": args.threads,
            "pairs": args.pairs,
        },
        "machine": benchutil.machine(),
        "recompute_s": statistics.median(times["recompute"]),
        "keep_s": statistics.median(times["keep"]),
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "times": times,
    }
    suffix = "" if args.model == "smollm" else f"_{args.model}"
    out = args.out or str(benchutil.RESULTS / f"recompute{suffix}.json")
    return benchutil.save_result(result, out, markdown)


def markdown(result: dict) -> str:
    s, m = result["setting"], result["machine"]
    table = benchutil.markdown_table(
        ["low-memory mode", "median step s", "x keep"],
        [
            ["pointwise recomputation (default)", result["recompute_s"], result["ratio"]],
            ["every activation kept", result["keep_s"], 1.0],
        ],
    )
    lo, hi = result["ratio_range"]
    return (
        f"Step time of the low-memory mode, {s['model']}, batch {s['batch']} x {s['seq']}, budget "
        f"{100 * s['budget_fraction']:.2g}%, {s['threads']} threads, one model, {s['pairs']} steps of each "
        f"mode alternating A/B/B/A ({m.get('date', '')}, {m.get('cpu', '')}). x keep = median of the "
        f"per-pair ratios (range {lo:.3f}-{hi:.3f}).\n\n" + table
    )


if __name__ == "__main__":
    main()
