"""The bounded path's two ways to the gathered products (aᵀb)[rows, cols], side by side, one thread.

`native.pair_dots` reads each pair token by token from a and b as stored; the other way copies the columns the
pairs read, as rows (`native.gather_columns`, the library's copy; `index_select(1, ...).t().contiguous()`, torch's,
timed beside it), and runs `native.gathered_dots` on the copies. Which one
wins depends on whether a and b stay in cache, so each shape is timed with the caches flushed first (a 64 MiB
write: in a training step a and b were written long before). `bounded.sampled_products` picks between them by
pairs per used column (`PAIR_FACTOR`, `PAIR_FACTOR_LARGE` past `PAIR_CACHE_BYTES`); the table shows where that
choice falls. It also times `native.index_set` (counting; `bounded.index_set` uses it from `INDEX_SET_MIN`
indices on) against `torch.unique(return_inverse=True)` (sorting), which the products call for their rows and
columns. Both ways give bitwise the same values (checked).

Example:
    python benchmarks/bench_products.py      # writes benchmarks/results/products.json and .md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path[:0] = [
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
]
import benchutil  # noqa: E402

from id3_callback import bounded, native  # noqa: E402

# (T, R, C): SmolLM2 2 x 256 (MLP up / down, attention), MiniLM 16 x 64 (MLP), small
SHAPES = [
    (512, 576, 1536),
    (512, 1536, 576),
    (512, 576, 576),
    (1024, 384, 1536),
    (256, 384, 384),
    (64, 384, 384),
]
PAIRS = [50, 200, 1000, 4000, 16000]


def timed(fn, inputs: tuple, flush: torch.Tensor, repeats: int) -> float:
    """Median ms of fn(*inputs) over `repeats` calls, each after a write over `flush` (caches cold)."""
    times = []
    for _ in range(repeats):
        flush.add_(1.0)
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def torch_gather(x: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    return x.index_select(1, used).t().contiguous()


def copied(a, b, rows, cols, gather=native.gather_columns):
    used_rows, row_at = bounded.index_set(rows, a.shape[1])
    used_cols, col_at = bounded.index_set(cols, b.shape[1])
    return native.gathered_dots(gather(a, used_rows), gather(b, used_cols), row_at, col_at)


def sorted_set(x: torch.Tensor, size: int):
    return torch.unique(x, return_inverse=True)


def both_sets(fn, rows, cols, height, width):
    return fn(rows, height), fn(cols, width)


def run(args) -> dict:
    torch.set_num_threads(1)
    flush = torch.empty(16 << 20)
    rows_out = []
    for tokens, height, width in SHAPES:
        gen = torch.Generator().manual_seed(tokens + height + width)
        a, b = torch.randn(tokens, height, generator=gen), torch.randn(tokens, width, generator=gen)
        factor = bounded.pair_factor(a, b)  # the library's rule, so the table shows its choice
        for n in PAIRS:
            flat = torch.randperm(height * width, generator=gen)[:n].sort().values
            rows, cols = flat // width, flat % width
            reference = native.pair_dots(a, b, rows, cols)
            for gather in (native.gather_columns, torch_gather):
                if not torch.equal(reference, copied(a, b, rows, cols, gather)):
                    raise AssertionError("pair_dots and the copies' gathered_dots differ")
            used = rows.unique().numel() + cols.unique().numel()
            in_place = timed(native.pair_dots, (a, b, rows, cols), flush, args.repeats)
            copies = timed(copied, (a, b, rows, cols), flush, args.repeats)
            torch_copies = timed(copied, (a, b, rows, cols, torch_gather), flush, args.repeats)
            counting = timed(both_sets, (native.index_set, rows, cols, height, width), flush, 5)
            sorting = timed(both_sets, (sorted_set, rows, cols, height, width), flush, 5)
            rows_out.append(
                {
                    "tokens": tokens,
                    "rows": height,
                    "cols": width,
                    "pairs": n,
                    "pairs_per_used_column": n / used,
                    "pair_dots_ms": in_place,
                    "copies_ms": copies,
                    "torch_copies_ms": torch_copies,
                    "faster": "pair_dots" if in_place < copies else "copies",
                    "chosen": "pair_dots" if n < factor * used else "copies",
                    "native_index_set_ms": counting,
                    "torch_unique_ms": sorting,
                }
            )
    return {
        "benchmark": "products",
        "machine": benchutil.machine(),
        "pair_factor": bounded.PAIR_FACTOR,
        "pair_factor_large": bounded.PAIR_FACTOR_LARGE,
        "pair_cache_bytes": bounded.PAIR_CACHE_BYTES,
        "rows": rows_out,
    }


def markdown(result: dict) -> str:
    lines = [
        f"Gathered products, caches cold, one thread ({result['machine']['cpu']}, load "
        f"{result['machine']['load_1min']:.1f}); medians in ms.",
        "",
        "| T x (R + C) | pairs | pairs / used column | pair_dots | gather_columns + gathered_dots "
        "| (index_select copies) | faster | chosen | native index_set | torch.unique |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['tokens']} x ({r['rows']} + {r['cols']}) | {r['pairs']} | {r['pairs_per_used_column']:.2f} "
            f"| {r['pair_dots_ms']:.3f} | {r['copies_ms']:.3f} | ({r['torch_copies_ms']:.3f}) | {r['faster']} "
            f"| {r['chosen']} "
            f"| {r['native_index_set_ms']:.3f} | {r['torch_unique_ms']:.3f} |"
        )
    agree = sum(r["faster"] == r["chosen"] for r in result["rows"])
    lines += ["", f"The choice matches the faster kernel in {agree} of {len(result['rows'])} cases."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(benchutil.RESULTS / "products.json"))
    args = parser.parse_args(argv)
    if native.library() is None:
        raise SystemExit(f"native kernels unavailable: {native.status()}")
    return benchutil.save_result(run(args), args.out, markdown)


if __name__ == "__main__":
    main()
