"""The `id3` command line: look into, merge, plot and compare deltas.

    id3 inspect DELTA [--base MODEL] [--json]   what a delta holds, per tensor and per layer x module type
    id3 merge BASE DELTA OUT                     base + delta as a full checkpoint (save_pretrained)
    id3 heatmap DELTA -o mask.png [--base MODEL] the layer x module-type heatmap as a PNG
    id3 diff A B [--json]                        overlap of two deltas' selections, per tensor

Errors (a missing file, a delta for another base, a damaged delta) print one line and exit 1.
Set ID3_DEBUG=1 for the traceback.

Example:
    $ id3 inspect outputs/delta.safetensors --json > delta.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .delta import Delta, DeltaError, apply_delta, load_delta


# ------------------------------------------------------------------------------------------------ reading
def base_fingerprint(delta: Delta) -> str:
    """A short SHA-256 over the delta's per-tensor checksums of the base values it overwrites (what
    `apply_delta` verifies): it names the (base, selection) pair, so two deltas of one base differ."""
    return hashlib.sha256(delta.metadata.get("base_sha256", "").encode()).hexdigest()[:16]


def _records(delta: Delta, sizes: dict[str, int] | None) -> list[dict]:
    """`logging.plots.tensor_counts`-style records; `numel` is the tensor's size when `sizes` is known."""
    from .logging.plots import parse_param_name

    records = []
    for kind, items in (
        ("selected", {n: int(i.numel()) for n, (i, _) in delta.sparse.items()}),
        ("dense", {n: int(v.numel()) for n, v in delta.dense.items()}),
    ):
        for name, count in sorted(items.items()):
            stack, layer, module = parse_param_name(name)
            numel = sizes.get(name) if sizes is not None else None
            records.append(
                {
                    "name": name,
                    "stack": stack,
                    "layer": layer,
                    "module": module,
                    "unmasked": count,
                    "numel": numel,
                    "density": None if not numel else count / numel,
                    "dense": kind == "dense",
                }
            )
    if sizes is not None:  # tensors of the base the delta leaves alone count too (a 0 cell, not a gap)
        listed = {r["name"] for r in records}
        for name, numel in sizes.items():
            if name not in listed:
                stack, layer, module = parse_param_name(name)
                records.append(
                    {
                        "name": name,
                        "stack": stack,
                        "layer": layer,
                        "module": module,
                        "unmasked": 0,
                        "numel": numel,
                        "density": 0.0,
                        "dense": False,
                    }
                )
    return records


def _grid(records: list[dict], sizes_known: bool):
    """The heatmap's grid. Without the base's sizes a cell holds its share of the selected entries."""
    from .logging.plots import density_grid

    if sizes_known:
        return density_grid(records)
    total = sum(r["unmasked"] for r in records if not r["dense"])
    return density_grid([{**r, "numel": total} for r in records])


def _base_sizes(base: str | None) -> dict[str, int] | None:
    if base is None:
        return None
    from .models import load_plain_model

    return {n: p.numel() for n, p in load_plain_model(base).named_parameters()}


def inspect_delta(path: str, base: str | None = None) -> dict:
    """Everything `id3 inspect` prints, as a dict (the `--json` output).

    Example:
        >>> info = inspect_delta("outputs/delta.safetensors")  # doctest: +SKIP
        >>> info["selected_entries"], info["bytes_per_entry"]  # doctest: +SKIP
        (103000, 8.4)
    """
    delta = load_delta(path)
    sizes = _base_sizes(base)
    records = _records(delta, sizes)
    selected = sum(r["unmasked"] for r in records if not r["dense"])
    dense = sum(r["unmasked"] for r in records if r["dense"])
    size = os.path.getsize(path)
    grid = _grid(records, sizes is not None)
    meta = delta.metadata
    return {
        "path": os.fspath(path),
        "file_bytes": size,
        "format": meta.get("format"),
        "method": meta.get("method"),
        "budget": int(meta["budget"]) if meta.get("budget", "").isdigit() else meta.get("budget"),
        "steps": int(meta["steps"]) if meta.get("steps", "").isdigit() else meta.get("steps"),
        "base_model": meta.get("base_model"),
        "base_fingerprint": base_fingerprint(delta),
        "tensors": len(delta.sparse) + len(delta.dense),
        "selected_entries": selected,
        "dense_entries": dense,
        "bytes_per_entry": size / max(selected + dense, 1),
        "per_tensor": [{k: r[k] for k in ("name", "unmasked", "numel", "density", "dense")} for r in records],
        "grid": {
            "value": "density" if sizes is not None else "share_of_selected",
            "rows": grid.rows,
            "columns": grid.columns,
            "selected": grid.unmasked.tolist(),
            "values": [[None if v != v else float(v) for v in row] for row in grid.density.tolist()],
        },
    }


def _format_inspect(info: dict) -> str:
    lines = [
        f"delta       {info['path']} ({info['file_bytes']:,} bytes, {info['format']})",
        f"method      {info['method']}, budget {info['budget']}, {info['steps']} steps",
        f"base        {info['base_model'] or '(unnamed)'}; checksum of the overwritten base values "
        f"{info['base_fingerprint']}",
        f"tensors     {info['tensors']}",
        f"selected    {info['selected_entries']:,} entries",
        f"dense       {info['dense_entries']:,} entries (tensors trained whole)",
        f"bytes/entry {info['bytes_per_entry']:.2f}",
        "",
    ]
    grid = info["grid"]
    what = "% of the cell's entries selected" if grid["value"] == "density" else "% of the selected entries"
    lines.append(f"per layer x module type ({what}):")
    if not grid["columns"]:
        lines.append("  (no selected entries)")
        return "\n".join(lines)
    cells = [["-" if v is None else f"{100 * v:.3g}%" for v in values] for values in grid["values"]]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(grid["columns"])]
    row_width = max(5, *(len(r) for r in grid["rows"]))
    lines.append(" " * row_width + "  " + "  ".join(c.rjust(w) for c, w in zip(grid["columns"], widths)))
    for row, values in zip(grid["rows"], cells):
        lines.append(row.ljust(row_width) + "  " + "  ".join(c.rjust(w) for c, w in zip(values, widths)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ commands
def cmd_inspect(args) -> None:
    info = inspect_delta(args.delta, args.base)
    print(json.dumps(info, indent=2) if args.json else _format_inspect(info))


def merge(base: str, delta: str, out: str, model_class: str | None = None) -> str:
    """Apply `delta` to the model at `base` (a folder or a GGUF file) and `save_pretrained` it to `out`.

    The checkpoint is written into a temporary folder next to `out`, then renamed: `out` appears complete
    or not at all. The tokenizer is copied when `base` has one.

    Example:
        >>> merge("base-folder", "outputs/delta.safetensors", "merged")  # doctest: +SKIP
    """
    from .models import gguf_location, load_plain_model

    out_path = Path(out)
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder.")
    load_delta(delta)  # a damaged delta fails before the (slow) model load
    folder, gguf_file = gguf_location(base)
    if not gguf_file and not Path(base).exists():
        raise FileNotFoundError(f"no base model at {base}")
    model = load_plain_model(folder, model_class, gguf_file=gguf_file)
    apply_delta(model, delta)
    tokenizer = _tokenizer(folder, gguf_file)
    parent = out_path.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=parent)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out_path.exists():
            out_path.rmdir()  # empty (checked above)
        os.replace(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.fspath(out_path)


def _tokenizer(folder: str, gguf_file: str | None):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
    if not gguf_file and not any((Path(folder) / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        if gguf_file:
            return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # a model without a usable tokenizer still merges
        print(f"id3 merge: note: tokenizer not copied ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def cmd_merge(args) -> None:
    out = merge(args.base, args.delta, args.out, args.model_class)
    print(f"merged {args.delta} into {args.base}: {out}")


def cmd_heatmap(args) -> None:
    from .logging.plots import figure_png, heatmap_figure, matplotlib_available

    if not matplotlib_available():
        raise ImportError("id3 heatmap needs matplotlib: pip install 'id3-callback[plots]'")
    delta = load_delta(args.delta)
    sizes = _base_sizes(args.base)
    grid = _grid(_records(delta, sizes), sizes is not None)
    meta = delta.metadata
    cell = "% of the tensor's entries" if sizes is not None else "% of the delta's selected entries"
    title = (
        f"ID3 [{meta.get('method')}] delta {Path(args.delta).name}\n"
        f"{int(grid.unmasked.sum()):,} selected entries; cell: {cell}"
    )
    label = "fraction unmasked" if sizes is not None else "share of the selected entries"
    data = figure_png(heatmap_figure(grid, title, colorbar_label=label))
    from .io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(args.output, write)
    print(f"heatmap: {args.output}")


def diff_deltas(a: str, b: str) -> dict:
    """Per tensor, how far two deltas' selections overlap: shared entries and Jaccard index.

    Tensors trained whole count every entry as selected. Example:
        >>> diff_deltas("seed0/delta.safetensors", "seed1/delta.safetensors")["jaccard"]  # doctest: +SKIP
        0.41
    """
    import torch

    da, db = load_delta(a), load_delta(b)

    def entries(d: Delta) -> dict[str, torch.Tensor | int]:
        out: dict[str, torch.Tensor | int] = {n: i for n, (i, _) in d.sparse.items()}
        out.update({n: v.numel() for n, v in d.dense.items()})  # whole: all entries 0..numel-1
        return out

    ea, eb = entries(da), entries(db)
    rows, total_a, total_b, total_shared = [], 0, 0, 0
    for name in sorted(set(ea) | set(eb)):
        x, y = ea.get(name), eb.get(name)
        na, nb = _count(x), _count(y)
        if x is None or y is None:
            shared = 0
        elif isinstance(x, int) or isinstance(y, int):
            shared = (
                min(na, nb)
                if isinstance(x, int) and isinstance(y, int)
                else (nb if isinstance(x, int) else na)
            )
        else:
            shared = int(torch.isin(x, y).sum())
        union = na + nb - shared
        rows.append(
            {"name": name, "a": na, "b": nb, "shared": shared, "jaccard": shared / union if union else 1.0}
        )
        total_a, total_b, total_shared = total_a + na, total_b + nb, total_shared + shared
    union = total_a + total_b - total_shared
    return {
        "a": os.fspath(a),
        "b": os.fspath(b),
        "base_model_a": da.metadata.get("base_model"),
        "base_model_b": db.metadata.get("base_model"),
        "entries_a": total_a,
        "entries_b": total_b,
        "shared": total_shared,
        "jaccard": total_shared / union if union else 1.0,
        "per_tensor": rows,
    }


def _count(x) -> int:
    return 0 if x is None else x if isinstance(x, int) else int(x.numel())


def cmd_diff(args) -> None:
    info = diff_deltas(args.a, args.b)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    if info["base_model_a"] != info["base_model_b"]:
        print(f"note: base models differ: {info['base_model_a']!r} and {info['base_model_b']!r}")
    width = max([6] + [len(r["name"]) for r in info["per_tensor"]])
    print(f"{'tensor'.ljust(width)}  {'A':>9}  {'B':>9}  {'shared':>9}  jaccard")
    for r in info["per_tensor"]:
        print(f"{r['name'].ljust(width)}  {r['a']:>9,}  {r['b']:>9,}  {r['shared']:>9,}  {r['jaccard']:.3f}")
    print(
        f"{'total'.ljust(width)}  {info['entries_a']:>9,}  {info['entries_b']:>9,}  "
        f"{info['shared']:>9,}  {info['jaccard']:.3f}"
    )


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="id3", description="Inspect, merge, plot and compare ID3 deltas.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="what a delta holds: tensors, entries, bytes, base, density table")
    p.add_argument("delta")
    p.add_argument("--base", help="the base model (folder or .gguf): cells show true densities")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_inspect)
    p = sub.add_parser("merge", help="apply a delta to a base model and save_pretrained the result")
    p.add_argument("base", help="the base model: a folder from save_pretrained, or a .gguf file")
    p.add_argument("delta")
    p.add_argument("out", help="a new folder for the merged checkpoint")
    p.add_argument("--model-class", help="transformers class to load BASE with (default: its config's)")
    p.set_defaults(run=cmd_merge)
    p = sub.add_parser("heatmap", help="the layer x module-type heatmap of a delta, as a PNG")
    p.add_argument("delta")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--base", help="the base model (folder or .gguf): cells show true densities")
    p.set_defaults(run=cmd_heatmap)
    p = sub.add_parser("diff", help="overlap of two deltas' selections per tensor (Jaccard, shared)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_diff)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `id3` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # errors stay one line: no loading reports or progress bars
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns on import (via peft)
    try:
        args.run(args)
    except (DeltaError, OSError, ValueError, ImportError, RuntimeError, KeyError) as err:
        if os.environ.get("ID3_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"id3 {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
