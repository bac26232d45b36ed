#!/usr/bin/env python
"""What streaming a tied table costs in step time: the low-memory mode on SmolLM2-135M, one model, steps
alternating between the streamed output layer (the default) and autograd's dense gradient of the tied table.

    python benchmarks/bench_tied.py          # writes benchmarks/results/tied.json + tied.md

Setting: the memory benchmark's (SmolLM2-135M-Instruct dequantized to fp32, batch 2 x 256 XSum tokens, budget
0.17%, 2 threads). Both modes run on the same model object in A/B/B/A order, so memory placement and
machine drift hit both alike; the ratio is the median of the per-pair ratios. Peak memory is measured by
`bench_memory.py` (one process per variant), not here.
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

from id3_callback import ID3Config, ID3Engine, SparseAdamW, selection  # noqa: E402
from id3_callback.sparse_grads import TiedOutputStreams  # noqa: E402

MODES = ("streamed", "dense")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--budget", type=float, default=0.0017)
    parser.add_argument("--total-steps", type=int, default=1000)
    parser.add_argument(
        "--pairs", type=int, default=8, help="steps of each mode (after one warm-up step each)"
    )
    parser.add_argument("--out", default=str(benchutil.RESULTS / "tied.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tokenizer = benchutil.smollm()
    model.config.use_cache = False
    model.train()
    batches = benchutil.xsum_batches(tokenizer, args.pairs + 1, args.batch, args.seq)
    engine = ID3Engine(model, ID3Config(budget=args.budget, low_memory=True))
    engine.start(args.total_steps)
    if not engine.streamed_tables:
        raise SystemExit("this model has no table tied to its output layer: nothing to compare")
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=2e-5)

    def step(inputs: dict, mode: str) -> float:
        # The dense mode takes the streams out for one step and then builds them again (private handles:
        # this is the A/B switch).
        low_memory = engine.low_memory_mode
        if mode == "dense":
            low_memory.streams.remove()
            low_memory.streams = None
        seconds = benchutil.train_step(model, inputs, engine, opt)
        if mode == "dense":
            tables = dict(engine.plan.tied_tables)
            low_memory.streams = TiedOutputStreams(tables, low_memory._on_output_rows, selection.SCORE_CHUNK)
        return seconds

    result = {
        "benchmark": "tied",
        "setting": {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
            "batch": args.batch,
            "seq": args.seq,
            "budget_fraction": args.budget,
            "threads": args.threads,
            "pairs": args.pairs,
            "tied_tables": engine.streamed_tables,
        },
        "machine": benchutil.machine(),
        **benchutil.alternate(step, MODES, batches),
    }
    return benchutil.save_result(result, args.out, markdown)


def markdown(result: dict) -> str:
    labels = ("streamed (default)", "autograd's dense gradient")
    return benchutil.ab_markdown(result, MODES, labels, "low-memory mode, tied table")


if __name__ == "__main__":
    main()
