#!/usr/bin/env python
"""Time and extra memory of one ID3 selection against the number of selectable entries N.

    python benchmarks/bench_scaling.py         # writes benchmarks/results/scaling.json + scaling.md

N runs from 1M to 200M entries of random fp32 weights and gradients, in tensors of at most 4M entries
(2-D, 1024 wide: no embedding shortcuts). One selection = `Scan.push_scores` into a
`StreamingTopK` of k = u_t = B/T entries (B = 0.17% of N, T = 1000): scoring, exclusion of the already
unmasked half of the budget, exact global top-k. Each N runs in a fresh process: build the tensors,
hand freed heap back to the OS, restart the peak-RSS counter, select (5 times, fastest), and report
peak RSS minus the RSS before: the extra memory of a selection, which tracemalloc cannot see (torch
allocates outside Python's allocator).

For contrast, "naive" (up to 50M) scores everything at once, concatenates and calls torch.topk: the
approach whose extra memory grows with N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
from torch import nn

# this checkout's id3_callback (and the helpers next to this file), whatever else is installed
sys.path[:0] = [
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
]

import benchutil  # noqa: E402

from id3_callback import ID3Config, ID3Engine, d3_scores  # noqa: E402
from id3_callback.selection import StreamingTopK  # noqa: E402

SIZES_M = (1, 2, 5, 10, 20, 50, 100, 200)
PIECE = 4 * 1024 * 1024
WIDTH = 1024


def build(n: int, seed: int = 0, device: str = "cpu") -> nn.ParameterList:
    g = torch.Generator(device=device).manual_seed(seed)
    params = nn.ParameterList()
    left = n
    while left > 0:
        size = min(PIECE, left)
        rows = max(1, size // WIDTH)
        shape = (rows, WIDTH) if rows * WIDTH == size else (size,)
        p = nn.Parameter(torch.randn(shape, generator=g, device=device) * 0.05)
        p.grad = torch.randn(shape, generator=g, device=device) * 1e-3
        params.append(p)
        left -= size
    return params


def child(n: int, method: str, repeats: int, device: str = "cpu") -> dict:
    model = build(n, device=device)
    cuda = device == "cuda"
    engine = ID3Engine(model, ID3Config(budget=0.0017))
    engine.start(1000)
    k = engine.schedule.target(501) - engine.schedule.target(500)
    # half the budget already unmasked (random entries): exclusion costs as in mid-training
    engine.add_global(
        torch.randperm(n, generator=torch.Generator().manual_seed(1))[: engine.budget // 2].to(device)
    )
    score = partial(d3_scores, eps=1e-3, exp=1.0)
    benchutil.trim_heap()
    before = benchutil.rss_mb()
    benchutil.reset_peak_rss()
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if method == "engine":
            top = StreamingTopK(k)
            engine.scan.push_scores(top, score)
            chosen = top.result()[1]
        else:  # naive: every score at once, then one topk over the concatenation
            scores = []
            for name, p in engine.unmasked.params.items():
                s = d3_scores(p.grad, p.detach()).reshape(-1)
                s[engine.unmasked.indices[name]] = float("-inf")
                scores.append(s)
            chosen = torch.topk(torch.cat(scores), k).indices
            del scores
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del chosen
    return {
        "n": n,
        "method": method,
        "k": k,
        "seconds": min(times),  # the least disturbed run: other processes only ever add time
        "seconds_median": statistics.median(times),
        "extra_mb": (torch.cuda.max_memory_allocated() - cuda_before) / 2**20
        if cuda
        else benchutil.peak_rss_mb() - before,
        "device": device,
        "rss_before_mb": before,
    }


def parent(args) -> dict:
    rows = []
    for size in args.sizes:
        for method in ("engine", "naive"):
            if method == "naive" and size > args.naive_max:
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(size), "--method", method]
            cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                continue
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
            row = json.loads(line[len("RESULT ") :])
            rows.append(row)
            print(
                f"[scaling] N={size / 1e6:g}M {method}: {row['seconds'] * 1000:.0f} ms, +{row['extra_mb']:.1f} MiB",
                flush=True,
            )
    engine_rows = [r for r in rows if r["method"] == "engine"]
    per_m = [r["seconds"] / (r["n"] / 1e6) * 1000 for r in engine_rows]
    return {
        "benchmark": "scaling",
        "setting": {
            "entries": "random fp32 weights and gradients, tensors of <= 4M entries",
            "k": "B/T with B = 0.17% of N, T = 1000; half of B already unmasked",
            "threads": args.threads,
            "repeats": args.repeats,
        },
        "machine": benchutil.machine(),
        "rows": rows,
        "engine_ms_per_million": {"min": min(per_m, default=None), "max": max(per_m, default=None)},
    }


def markdown(result: dict) -> str:
    by = {}
    for r in result["rows"]:
        by.setdefault(r["n"], {})[r["method"]] = r
    rows = []
    for n in sorted(by):
        e, nv = by[n].get("engine"), by[n].get("naive")
        rows.append(
            [
                f"{n / 1e6:g}M",
                e["k"] if e else None,
                e["seconds"] * 1000 if e else None,
                e["seconds"] * 1e9 / n if e else None,
                e["extra_mb"] if e else None,
                nv["seconds"] * 1000 if nv else None,
                nv["extra_mb"] if nv else None,
            ]
        )
    header = ["N", "k", "engine ms", "ns/entry", "engine extra MiB", "naive ms", "naive extra MiB"]
    text = (
        f"One selection against N ({result['setting']['threads']} threads, {result['machine']['date']}, "
        f"{result['machine']['cpu']}).\n\n"
    )
    return text + benchutil.markdown_table(header, rows)


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="engine", help=argparse.SUPPRESS)
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(float(x) * 1e6) for x in s.split(",")],
        default=[m * 1_000_000 for m in SIZES_M],
        help="comma-separated, in millions",
    )
    parser.add_argument("--naive-max", type=float, default=50e6)
    parser.add_argument("--device", default="cpu", help="cuda: extra memory from max_memory_allocated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(benchutil.RESULTS / "scaling.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child is not None:
        print(
            "RESULT " + json.dumps(child(int(args.child), args.method, args.repeats, args.device)), flush=True
        )
        return None
    result = parent(args)
    return benchutil.save_result(result, args.out, markdown)


if __name__ == "__main__":
    main()
