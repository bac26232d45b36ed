#!/usr/bin/env python
"""What pointwise recomputation costs in step time: ID3's low-memory mode on one model, steps alternating
between storing the cheapest saved activations as one-op recipes (the mode's default) and keeping them.

    python benchmarks/bench_recompute.py                  # SmolLM2-135M, 2 x 256: recompute.json + .md
    python benchmarks/bench_recompute.py --model minilm   # all-MiniLM-L6-v2, 16 x 64 SST-2

Settings: SmolLM2 as in the memory benchmark, MiniLM as in the step benchmark; budget 0.17%, 2 threads.
The two modes alternate on one model (`benchutil.alternate`); what the recipes save in peak memory is
`bench_memory.py`'s to measure (rows `id3_low_memory` and `id3_low_memory_keep`).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path[:0] = [
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
]

import benchutil  # noqa: E402

from id3_callback import ID3Config, ID3Engine, SparseAdamW  # noqa: E402
from id3_callback.recompute import PointwiseRecompute  # noqa: E402

MODES = ("recompute", "keep")
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

    def step(inputs: dict, mode: str) -> float:
        # The keep mode takes the recipes' hooks out for one step (a private handle: this is the A/B switch).
        if mode == "keep":
            engine._recompute.remove()
        seconds = benchutil.train_step(model, inputs, engine, opt)
        if mode == "keep":
            engine._recompute = PointwiseRecompute(model)
        return seconds

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
        **benchutil.alternate(step, MODES, batches),
    }
    suffix = "" if args.model == "smollm" else f"_{args.model}"
    out = args.out or str(benchutil.RESULTS / f"recompute{suffix}.json")
    return benchutil.save_result(result, out, markdown)


def markdown(result: dict) -> str:
    labels = ("pointwise recomputation (default)", "every activation kept")
    return benchutil.ab_markdown(result, MODES, labels, "low-memory mode")


if __name__ == "__main__":
    main()
