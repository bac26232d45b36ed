"""The group bound's native test alone, against the same kernel built from another revision's source.

Times `id3_bound_hits` on SmolLM2's layer shapes (synthetic group norms, a level that lets `frac` of the
entries through) with the current `native_kernels.c` and with a baseline source (for instance
`git show 39a410b:id3_callback/native_kernels.c > /tmp/old.c`), interleaved in one process, one thread.
It also checks that both builds return the same hits. Writes benchmarks/results/bound_kernel.json and .md.

Example:
    python benchmarks/bench_bound_kernel.py --baseline-source /tmp/old.c
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402

from id3_callback import native  # noqa: E402


def build(source: str) -> ctypes.CDLL:
    out = Path(tempfile.mkdtemp()) / "baseline.so"
    subprocess.run(["gcc", *native.FLAGS, "-o", str(out), source], check=True, capture_output=True)
    lib = ctypes.CDLL(str(out))
    current = native.library()
    lib.id3_bound_hits.restype = current.id3_bound_hits.restype
    lib.id3_bound_hits.argtypes = current.id3_bound_hits.argtypes
    return lib


def bound_case(libs: dict, rows: int, cols: int, frac: float, reps: int, gen) -> dict:
    tokens, groups, eps = 512, 16, 1e-3
    dy = torch.randn(tokens, rows, generator=gen) * torch.rand(rows, generator=gen) ** 3
    x = torch.randn(tokens, cols, generator=gen) * torch.rand(cols, generator=gen)
    an = (dy.view(groups, tokens // groups, rows) ** 2).sum(1).sqrt().contiguous()
    bn = (x.view(groups, tokens // groups, cols) ** 2).sum(1).sqrt().contiguous()
    w = torch.randn(rows, cols, generator=gen) * 0.04
    low = float(torch.quantile(((an.t() @ bn) / (w.abs() + eps)).view(-1)[::7], 1 - frac))
    pos = {name: torch.empty(rows * cols, dtype=torch.long) for name in libs}
    found, times = {}, {name: [] for name in libs}
    for rep in range(reps):
        for name in list(libs) if rep % 2 else list(libs)[::-1]:  # alternate the order
            lib = libs[name]
            args = (an.data_ptr(), an.stride(0), bn.data_ptr(), groups, cols, w.data_ptr(), 0, rows, 1, low)
            t0 = time.perf_counter()
            found[name] = lib.id3_bound_hits(*args, low * eps, pos[name].data_ptr())
            times[name].append(time.perf_counter() - t0)
    same = found["baseline"] == found["current"] and torch.equal(
        pos["baseline"][: found["baseline"]], pos["current"][: found["current"]]
    )
    ms = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
    return {"shape": f"{rows} x {cols}", "hits": found["current"] / (rows * cols), "same_hits": same, **ms}


def markdown(result: dict) -> str:
    rows = [
        [
            r["shape"],
            f"{r['hits']:.3%}",
            f"{r['baseline']:.2f}",
            f"{r['current']:.2f}",
            f"{r['current'] / r['baseline']:.2f}",
            r["same_hits"],
        ]
        for r in result["bound_hits"]
    ]
    header = ["bound_hits, 16 groups, T = 512", "hits", "baseline ms", "current ms", "ratio", "same hits"]
    return (
        f"# Bound kernel, current against {result['baseline']} (1 thread, medians, interleaved)\n\n"
        + benchutil.markdown_table(header, rows)
        + "\n"
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-source", required=True, help="a native_kernels.c to compare with")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=str(benchutil.RESULTS / "bound_kernel.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if native.library() is None:
        raise SystemExit("native kernels unavailable: nothing to time")
    libs = {"baseline": build(args.baseline_source), "current": native.library()}
    gen = torch.Generator().manual_seed(0)
    cases = [(1536, 576, 0.002), (576, 576, 0.002), (49152, 576, 0.0002), (1536, 576, 0.02)]
    result = {
        "benchmark": "bound_kernel",
        "baseline": args.baseline_source,
        "machine": benchutil.machine(),
        "bound_hits": [bound_case(libs, r, c, f, args.reps, gen) for r, c, f in cases],
    }
    return benchutil.save_result(result, args.out, markdown)


if __name__ == "__main__":
    main()
