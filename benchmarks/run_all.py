#!/usr/bin/env python
"""Run the performance suite: step time, peak memory, selection scaling; tables, plots, docs.

    python benchmarks/run_all.py                 # ~70 min on 2 idle cores (memory: ~60 fresh processes)
    python benchmarks/run_all.py --skip memory   # step time and scaling only, ~5 min
    python benchmarks/run_all.py --quick         # fewer steps and sizes
    PYTHONPATH=/tmp/so-site python benchmarks/run_all.py   # with the official ID3 (optional install:
                                                           # pip install --no-deps --target /tmp/so-site selective-optimizers==0.4)

Writes benchmarks/results/{step,memory*,tied,recompute*,scaling}.json (+ .md each: one current file per
benchmark; earlier runs live in git history), benchmarks/results/RESULTS.md,
docs/step_breakdown.png, docs/scaling.png, and refreshes the results block of docs/performance.md.
Each benchmark runs in its own process (the memory one in one process per variant), one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

# this checkout's id3_callback (and the helpers next to this file), whatever else is installed
sys.path[:0] = [
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
]

import benchutil  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def run(script: str, extra: list[str]) -> None:
    cmd = [sys.executable, os.path.join(HERE, script), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def plot_step(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ["fwd_bwd", "scoring", "selection", "masking", "engine_other", "optimizer", "zero_grad"]
    colors = ["#9e9e9e", "#e6550d", "#fdae6b", "#3182bd", "#c6dbef", "#31a354", "#a1d99b"]
    labels = [
        "forward+backward",
        "scoring",
        "selection",
        "masking",
        "engine (other)",
        "optimizer",
        "zero_grad",
    ]
    names = list(result["variants"])
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.6))
    for y, name in enumerate(names):
        row = result["variants"][name]
        b = row.get("breakdown") or {"fwd_bwd": row["fwd_bwd"], "optimizer": row["optimizer"]}
        b = {**b, "zero_grad": row.get("zero_grad", 0.0)}
        left = 0.0
        for part, color, label in zip(parts, colors, labels):
            width = max(b.get(part, 0.0), 0.0)
            ax.barh(y, width, left=left, color=color, label=label if y == 0 else None)
            left += width
        ax.text(
            left,
            y,
            f"  {row['step']:.0f} ms" + (f" ({row['ratio_vs_full']:.2f}x)" if "ratio_vs_full" in row else ""),
            va="center",
            fontsize=8,
        )
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step (median)")
    s = result["setting"]
    ax.set_title(
        f"all-MiniLM-L6-v2, batch {s['batch']}x{s['seq']}, budget {100 * s['budget_fraction']:.2f}%, "
        f"{s['threads']} threads",
        fontsize=9,
    )
    handles, labs = ax.get_legend_handles_labels()
    fig.legend(handles, labs, fontsize=7, loc="lower center", ncol=4, frameon=False)
    ax.set_xlim(0, ax.get_xlim()[1] * 1.2)
    ax.text(
        0,
        -0.1 * len(names) - 0.9,
        "bars: instrumented phase (ID3 parts timed); labels: headline medians",
        fontsize=7,
        color="gray",
    )
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for method, style in (("engine", "o-"), ("naive", "s--")):
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["n"])
        if not rows:
            continue
        n = [r["n"] / 1e6 for r in rows]
        label = "ID3 engine (streaming)" if method == "engine" else "naive cat + topk"
        a.loglog(n, [r["seconds"] * 1000 for r in rows], style, label=label)
        b.semilogx(n, [r["extra_mb"] for r in rows], style, label=label)
    engine = sorted((r for r in result["rows"] if r["method"] == "engine"), key=lambda r: r["n"])
    if engine:  # a line through the largest point with slope 1: linear time
        top = engine[-1]
        xs = [r["n"] / 1e6 for r in engine]
        a.loglog(xs, [top["seconds"] * 1000 * x / xs[-1] for x in xs], ":", color="gray", label="linear in N")
    a.set_xlabel("selectable entries N (millions)")
    a.set_ylabel("ms per selection")
    a.legend(fontsize=7)
    b.set_xlabel("selectable entries N (millions)")
    b.set_ylabel("extra peak RSS (MiB)")
    b.legend(fontsize=7)
    fig.suptitle(f"One selection, {result['setting']['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def refresh_doc(text: str) -> None:
    path = benchutil.DOCS / "performance.md"
    if not path.exists():
        return
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        return
    block = f"{BEGIN}\n{text}\n{END}"
    benchutil.write_text(
        re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S), path
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and sizes (~4 min)")
    parser.add_argument("--skip", default="", help="comma-separated: step,memory,scaling")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    threads = ["--threads", str(args.threads)]
    if "step" not in skip:
        run("bench_step.py", threads + (["--steps", "8", "--breakdown-steps", "4"] if args.quick else []))
    if "memory" not in skip:
        # The setting, repeated: glibc's default heap makes single peaks vary from run to run.
        run("bench_memory.py", threads + (["--steps", "1"] if args.quick else ["--repeats", "3"]))
        # A short sequence: activations are small, so gradients dominate (where low-memory mode shows).
        small = ["--batch", "1", "--seq", "32"]
        out = ["--out", str(benchutil.RESULTS / "memory_small.json")]
        run(
            "bench_memory.py",
            threads + small + out + (["--steps", "1"] if args.quick else ["--repeats", "2"]),
        )
        # glibc's default dynamic mmap threshold keeps freed blocks up to 32 MiB in the heap, so peak RSS
        # also counts fragmentation; a fixed threshold returns them at once and RSS tracks live memory.
        for name, shape in (("memory_mmap", []), ("memory_small_mmap", small)):
            mmap = ["--mmap-threshold", "131072", "--out", str(benchutil.RESULTS / f"{name}.json")]
            run("bench_memory.py", threads + shape + mmap + (["--steps", "1"] if args.quick else []))
        # Gradient checkpointing: saved activations shrink to one per layer for every variant alike, so the
        # gradients, not the activations, set the peak; with glibc's default and with a fixed threshold.
        ckpt = ["--checkpointing", "--variants", "full,lora,id3,id3_low_memory,grad_floor"]
        for name, extra in (("memory_ckpt", []), ("memory_ckpt_mmap", ["--mmap-threshold", "131072"])):
            out = ["--out", str(benchutil.RESULTS / f"{name}.json")]
            run("bench_memory.py", threads + ckpt + extra + out + (["--steps", "1"] if args.quick else []))
        # What the low-memory mode's streamed tied table costs in step time (SmolLM2, one model, A/B).
        run("bench_tied.py", threads + (["--pairs", "2"] if args.quick else []))
        # What its pointwise recomputation costs in step time, on both models (one model each, A/B).
        run("bench_recompute.py", threads + (["--pairs", "2"] if args.quick else []))
        run("bench_recompute.py", threads + ["--model", "minilm"] + (["--pairs", "2"] if args.quick else []))
    if "scaling" not in skip:
        run(
            "bench_scaling.py", threads + (["--sizes", "1,10,50,200", "--repeats", "3"] if args.quick else [])
        )

    sections = []
    titles = (
        ("step", "Step time"),
        ("memory", "Peak memory, the issue's setting (repeated rounds)"),
        ("memory_mmap", "Peak memory, allocator returning freed memory at once"),
        ("memory_small", "Peak memory, short sequences (gradients dominate)"),
        ("memory_small_mmap", "Peak memory, short sequences, allocator returning freed memory at once"),
        ("memory_ckpt", "Peak memory with gradient checkpointing"),
        (
            "memory_ckpt_mmap",
            "Peak memory with gradient checkpointing, allocator returning freed memory at once",
        ),
        ("tied", "Low-memory mode: step time with the tied table streamed or dense"),
        ("recompute", "Low-memory mode: step time with and without pointwise recomputation (SmolLM2)"),
        ("recompute_minilm", "Low-memory mode: step time with and without pointwise recomputation (MiniLM)"),
        ("scaling", "Selection scaling"),
    )
    for name, title in titles:
        path = benchutil.RESULTS / f"{name}.json"
        md = path.with_suffix(".md")
        if md.exists():
            sections.append(f"## {title}\n\n{md.read_text().strip()}\n")
        if path.exists():
            result = json.loads(path.read_text())
            if name == "step":
                plot_step(result, benchutil.DOCS / "step_breakdown.png")
            if name == "scaling":
                plot_scaling(result, benchutil.DOCS / "scaling.png")
    header = (
        "# Benchmark results\n\nRegenerate: `python benchmarks/run_all.py` (add `PYTHONPATH=/tmp/so-site` after "
        "`pip install --no-deps --target /tmp/so-site selective-optimizers==0.4` to include the official ID3). "
        "See docs/performance.md for what the numbers mean.\n\n"
    )
    text = "\n".join(sections)
    benchutil.write_text(header + text, benchutil.RESULTS / "RESULTS.md")
    refresh_doc(text.replace("## ", "### "))
    print(header + text)


if __name__ == "__main__":
    main()
