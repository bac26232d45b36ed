#!/usr/bin/env python
"""A/B of `bench_step.py`'s step between two package trees, interleaved in one run: does a change move it?

    python benchmarks/bench_ab_commits.py --base d3e0612                  # that commit against this checkout
    python benchmarks/bench_ab_commits.py --base d3e0612 --steps 60 --variants full,id3,id3_low_memory
    python benchmarks/bench_ab_commits.py --base d3e0612 --steps 2 --warmup 1 --out /tmp/ab.json   # smoke test

The base commit is exported with `git archive` into a temporary folder; each tree runs in a child process
of its own (its own `id3_callback` and its own `bench_step.py`, so each side builds its variants with the
code of its commit) on the same MiniLM copies and the same SST-2 batches. The parent hands out one batch
at a time, alternating which tree goes first (A/B/B/A), so machine load hits both alike; only one child
computes at a time. Reported per variant: each tree's median step time, the per-step ratio head / base
(median and quartiles: 1.00 means unchanged), and each tree's per-step ratio to `full` (bench_step's
headline numbers). At the end each child hashes its models' weights and unmasked sets: equal hashes say
the two trees trained bitwise alike. Writes JSON + a markdown table (`--out`, default
benchmarks/results/ab_commits.json). Time only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ------------------------------------------------------------------------------------------------ the child
def worker(args) -> None:
    """Runs in a tree's own interpreter: builds bench_step's variants with that tree's code, then answers
    'step <i>' with one JSON line of stage times per variant, and 'quit' with the weights' hashes."""
    sys.path[:0] = [os.path.join(args.tree, "benchmarks"), args.tree]
    import bench_step
    import benchutil
    import torch

    torch.set_num_threads(args.threads)
    args.device = "cpu"  # bench_step's setting; these A/Bs are CPU timings
    count = args.warmup + args.steps + 1
    if args.model == "minilm":
        batches = benchutil.sst2_batches(benchutil.minilm_tokenizer(), count, args.batch, args.seq)
    else:
        batches = benchutil.xsum_batches(benchutil.smollm()[1], count, args.batch, args.seq)
    variants = bench_step.build_variants(args, batches[0])
    import id3_callback

    ready = {"ready": [v.name for v in variants], "package": os.path.dirname(id3_callback.__file__)}
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "quit":
            hashes = {}
            for v in variants:
                h = hashlib.sha256()
                for p in v.model.state_dict().values():
                    h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
                if v.engine is not None:
                    h.update(v.engine.unmasked.fingerprint().encode())
                hashes[v.name] = h.hexdigest()[:16]
            print(json.dumps({"hashes": hashes}), flush=True)
            return
        i = int(command[1])
        order = variants[i % len(variants) :] + variants[: i % len(variants)]
        print(json.dumps({v.name: v.step(batches[1 + i]) for v in order}), flush=True)


# ----------------------------------------------------------------------------------------------- the parent
def export_commit(commit: str, into: str) -> str:
    """`git archive` of `commit` (the package and the benchmarks) into folder `into`."""
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", commit, "id3_callback", "benchmarks"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


class Child:
    def __init__(self, label: str, tree: str, args) -> None:
        import benchutil  # this checkout's: where the models and data are

        path = os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")]))  # e.g. the official ID3's
        env = dict(os.environ, PYTHONPATH=path, ID3_SHARED=str(benchutil.SHARED))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--tree", tree]
        for key in (
            "model",
            "variants",
            "threads",
            "batch",
            "seq",
            "budget",
            "steps",
            "warmup",
            "total_steps",
            "lr",
        ):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        self.label = label
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = self._read()
        package = os.path.realpath(ready["package"])
        if not package.startswith(os.path.realpath(tree) + os.sep):
            raise SystemExit(f"the {label} worker imported id3_callback from {package}, not from {tree}")
        self.names = ready["ready"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.label} worker exited early (rc {self.proc.wait()})")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def summarize(steps: dict[str, list[dict]], names: list[str]) -> dict:
    out = {}
    for name in names:
        base = [s[name]["step"] for s in steps["base"]]
        head = [s[name]["step"] for s in steps["head"]]
        ratios = [h / b for h, b in zip(head, base)]
        row = {
            "base_ms": statistics.median(base),
            "head_ms": statistics.median(head),
            "head_over_base": statistics.median(ratios),
            "head_over_base_quartiles": quartiles(ratios),
        }
        if "full" in names:
            for side in ("base", "head"):
                per_step = [s[name]["step"] / s["full"]["step"] for s in steps[side]]
                row[f"{side}_x_full"] = statistics.median(per_step)
        out[name] = row
    return out


def markdown(result: dict) -> str:
    s = result["setting"]
    data = "SmolLM2-135M, XSum" if s.get("model") == "smollm2" else "MiniLM, SST-2"
    lines = [
        f"Step time A/B, `bench_step.py` variants on {data} {s['batch']} x {s['seq']}, {s['threads']} threads: "
        f"base = commit {s['base']}, head = {s['head']}; {s['steps']} measured steps per tree, interleaved "
        f"(A/B/B/A), one child process per tree ({result['machine']['date']}, load {result['machine']['load_1min']:.2f}).",
        "",
        "| variant | base ms | head ms | head / base (median, quartiles) | base x full | head x full | bitwise equal |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["variants"].items():
        lo, hi = row["head_over_base_quartiles"]
        lines.append(
            f"| {name} | {row['base_ms']:.0f} | {row['head_ms']:.0f} | {row['head_over_base']:.3f} ({lo:.2f}-{hi:.2f}) "
            f"| {row.get('base_x_full', float('nan')):.3f} | {row.get('head_x_full', float('nan')):.3f} "
            f"| {result['bitwise_equal'][name]} |"
        )
    return "\n".join(lines) + "\n"


def parent(args) -> dict:
    sys.path[:0] = [HERE, ROOT]
    import benchutil

    tmp = tempfile.mkdtemp(prefix="id3_ab_")
    try:
        base_tree = export_commit(args.base, tmp)
        head_label = args.head or "this checkout"
        head_tree = export_commit(args.head, tempfile.mkdtemp(dir=tmp)) if args.head else ROOT
        children = {"base": Child("base", base_tree, args), "head": Child("head", head_tree, args)}
        names = children["base"].names
        if children["head"].names != names:
            raise SystemExit(f"the trees built different variants: {names} vs {children['head'].names}")
        steps: dict[str, list[dict]] = {"base": [], "head": []}
        for i in range(args.warmup + args.steps):
            order = ("base", "head") if i % 2 == 0 else ("head", "base")
            for side in order:
                times = children[side].ask(f"step {i}")
                if i >= args.warmup:
                    steps[side].append(times)
            print(f"step {i + 1}/{args.warmup + args.steps}", file=sys.stderr, flush=True)
        hashes = {side: child.ask("quit")["hashes"] for side, child in children.items()}
        for child in children.values():
            child.proc.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "benchmark": "ab_commits",
        "setting": {
            "base": args.base,
            "head": head_label,
            "model": args.model,
            "variants": names,
            "threads": args.threads,
            "batch": args.batch,
            "seq": args.seq,
            "budget_fraction": args.budget,
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "machine": benchutil.machine(),
        "variants": summarize(steps, names),
        "bitwise_equal": {n: hashes["base"][n] == hashes["head"][n] for n in names},
        "hashes": hashes,
        "steps": steps,
    }
    return benchutil.save_result(result, args.out, markdown)  # prints the table too


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="d3e0612", help="commit (or ref) to compare against")
    parser.add_argument("--head", default=None, help="commit to compare (default: this checkout, as it is)")
    parser.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    parser.add_argument("--variants", default="full,id3,id3_low_memory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.0017)
    parser.add_argument("--steps", type=int, default=40, help="measured steps per tree")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--total-steps", type=int, default=1000, help="the schedule's T (ID3 starts at T/2)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "ab_commits.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    return parent(args)


if __name__ == "__main__":
    main()
