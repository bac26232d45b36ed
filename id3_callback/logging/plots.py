"""Where the unmasked entries sit: per-tensor counts, a layers x module-types density grid, and its heatmap.

Parameter names are split at their first numeric component: `encoder.layer.3.attention.self.query.weight`
is layer 3 of the stack `encoder.layer`, module type `attention.self.query.weight`. Parameters outside any
numbered stack (embeddings, final norm, heads) share one extra row. Dense tensors (trained fully, outside
the selection) are listed in the counts but left out of the grid, which shows the selection alone.

Example:
    >>> parse_param_name("model.layers.3.self_attn.q_proj.weight")
    ('model.layers', 3, 'self_attn.q_proj.weight')
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from transformers import TrainerCallback

from ..io import atomic_write

if TYPE_CHECKING:
    from ..callback import ID3Callback
    from ..engine import ID3Engine

OTHER_ROW = "other (no layer)"
HEATMAP_FILE = "mask_density.png"
_LAYER = re.compile(r"^(?:(?P<stack>.*?)\.)?(?P<index>\d+)\.(?P<rest>.+)$")
# Wrappers that add nothing to a label: PEFT's `base_model.model.`, DDP's `module.`.
_WRAPPERS = ("base_model.model.", "module.")


def parse_param_name(name: str) -> tuple[str | None, int | None, str]:
    """(stack, layer index, module type) of a parameter name; (None, None, name) outside numbered stacks.

    Example:
        >>> parse_param_name("encoder.layer.3.attention.self.query.weight")
        ('encoder.layer', 3, 'attention.self.query.weight')
        >>> parse_param_name("embeddings.word_embeddings.weight")
        (None, None, 'embeddings.word_embeddings.weight')
    """
    for prefix in _WRAPPERS:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    match = _LAYER.match(name)
    if match is None:
        return None, None, name
    return match["stack"] or "", int(match["index"]), match["rest"]


def tensor_counts(engine: ID3Engine) -> list[dict]:
    """One record per trainable tensor: name, stack, layer, module, unmasked, numel, density, dense.

    Example:
        >>> tensor_counts(engine)[0]  # doctest: +SKIP
        {'name': 'bert.embeddings.word_embeddings.weight', 'stack': None, 'layer': None, ...}
    """
    records = []
    unmasked = engine.unmasked
    selected = unmasked.per_tensor_counts()  # counts a fully unmasked tensor ('full') without an index list
    for kind, tensors in (("selected", unmasked.params), ("dense", unmasked.dense)):
        for name, p in tensors.items():
            stack, layer, module = parse_param_name(name)
            count = selected[name] if kind == "selected" else p.numel()
            records.append(
                {
                    "name": name,
                    "stack": stack,
                    "layer": layer,
                    "module": module,
                    "unmasked": int(count),
                    "numel": int(p.numel()),
                    "density": count / max(p.numel(), 1),
                    "dense": kind == "dense",
                }
            )
    return records


def _row_labels(stacks: list[str]) -> dict[str, str]:
    """Short names for stacks: drop the leading components all stacks share, keep at least the last one."""
    parts = [s.split(".") if s else [] for s in stacks]
    common = 0
    while (
        len(stacks) > 1 and all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1
    ):
        common += 1
    if len(stacks) == 1:
        common = max(len(parts[0]) - 1, 0)
    return {s: ".".join(p[common:]) for s, p in zip(stacks, parts)}


@dataclass
class DensityGrid:
    """Unmasked counts of the selectable tensors, summed per (row = layer, column = module type).

    `numel` is 0 where no tensor exists for that cell; `density` is NaN there.
    """

    rows: list[str]
    columns: list[str]
    unmasked: np.ndarray
    numel: np.ndarray

    @property
    def density(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.numel > 0, self.unmasked / np.maximum(self.numel, 1), np.nan)

    def row_totals(self) -> list[tuple[str, int, int]]:
        """(row label, unmasked, numel) per row."""
        return [(r, int(u), int(n)) for r, u, n in zip(self.rows, self.unmasked.sum(1), self.numel.sum(1))]


def density_grid(records: list[dict]) -> DensityGrid:
    """Aggregate `tensor_counts` records (dense ones skipped) into a layers x module-types grid.

    Example:
        >>> grid = density_grid(tensor_counts(engine))  # doctest: +SKIP
        >>> grid.rows[:2], grid.columns[:2]              # doctest: +SKIP
        (['layer.0', 'layer.1'], ['attention.self.query.weight', 'attention.self.query.bias'])
    """
    selected = [r for r in records if not r["dense"]]
    stacks = list(dict.fromkeys(r["stack"] for r in selected if r["stack"] is not None))
    labels = _row_labels(stacks) if stacks else {}
    layer_rows = sorted(
        {(stacks.index(r["stack"]), r["layer"]) for r in selected if r["stack"] is not None},
    )
    rows = [f"{labels[stacks[s]]}.{i}" if labels[stacks[s]] else str(i) for s, i in layer_rows]
    row_of = {key: n for n, key in enumerate(layer_rows)}
    if any(r["stack"] is None for r in selected):
        rows.append(OTHER_ROW)
    # Columns: module types of the layers first (in model order), then the non-layer tensors.
    columns = list(dict.fromkeys(r["module"] for r in selected if r["stack"] is not None))
    columns += list(dict.fromkeys(r["module"] for r in selected if r["stack"] is None))
    col_of = {c: n for n, c in enumerate(columns)}
    unmasked = np.zeros((len(rows), len(columns)), dtype=np.int64)
    numel = np.zeros_like(unmasked)
    for r in selected:
        i = len(rows) - 1 if r["stack"] is None else row_of[(stacks.index(r["stack"]), r["layer"])]
        j = col_of[r["module"]]
        unmasked[i, j] += r["unmasked"]
        numel[i, j] += r["numel"]
    return DensityGrid(rows, columns, unmasked, numel)


def heatmap_figure(
    grid: DensityGrid, title: str = "ID3 mask density", colorbar_label: str = "fraction unmasked"
):
    """A matplotlib `Figure` of the grid: log-scaled colours, per-cell percentages, a labelled colorbar.

    Uses the object-oriented API (no pyplot), so it works under any backend and leaks no global figures.

    Example:
        >>> fig = heatmap_figure(density_grid(tensor_counts(engine)))  # doctest: +SKIP
        >>> fig.savefig("mask_density.png")                             # doctest: +SKIP
    """
    from matplotlib import colormaps, colors
    from matplotlib.figure import Figure

    density = grid.density
    n_rows, n_cols = density.shape
    # Margins in inches from the label lengths: tight_layout would cost a second full draw.
    left = 0.7 + 0.065 * max((len(r) for r in grid.rows), default=8)
    bottom = 0.75 + 0.046 * max((len(c) for c in grid.columns), default=8)  # labels slanted at 60 degrees
    top, right = 0.65, 0.6
    width = min(left + right + max(0.5 * n_cols, 3.0), 40.0)
    height = min(top + bottom + 0.36 * max(n_rows, 3), 40.0)
    fig = Figure(figsize=(width, height), dpi=110)
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height
    )
    ax = fig.add_subplot(1, 1, 1)
    positive = density[np.isfinite(density) & (density > 0)]
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9", under="white")
    if positive.size:
        low, high = float(positive.min()), float(positive.max())
        if high / low < 10:  # a narrow range reads better on a linear scale
            norm = colors.Normalize(vmin=low * 0.999, vmax=max(high, low * 1.001))
            scale = "linear"
        else:
            norm = colors.LogNorm(vmin=low, vmax=high)
            scale = "log scale"
    else:
        norm, scale = colors.Normalize(vmin=1e-9, vmax=1.0), "linear"
    # Zeros go below vmin so they take the "under" colour (white); log scaling would mask them as "bad".
    shown = np.ma.masked_invalid(np.where(density == 0, norm.vmin * 0.5, density))
    image = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(
        range(n_cols), labels=grid.columns, rotation=60, ha="right", rotation_mode="anchor", fontsize=8
    )
    ax.set_yticks(range(n_rows), labels=grid.rows, fontsize=8)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    if n_rows * n_cols <= 600:  # annotate cells with the percentage unmasked
        for i in range(n_rows):
            for j in range(n_cols):
                d = density[i, j]
                if not np.isfinite(d):
                    continue
                text = "0" if d == 0 else _percent(d)
                dark = d > 0 and norm(d) < 0.6
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if dark else "black")
    bar = fig.colorbar(image, ax=ax, extend="min", fraction=0.25 / width, pad=0.12 / width)
    bar.set_label(f"{colorbar_label} ({scale})", fontsize=8)
    fig.text(0.01, 0.01, "white: 0 unmasked   grey: no such tensor", fontsize=7, color="#555555")
    return fig


def _percent(fraction: float) -> str:
    pct = 100.0 * fraction
    return f"{pct:.2g}%" if pct < 10 else f"{pct:.0f}%"


def heatmap_title(engine: ID3Engine, step: int | None = None) -> str:
    where = f" after step {step}" if step is not None else ""
    used = 100.0 * len(engine.unmasked) / max(engine.budget, 1)
    return (
        f"ID3 [{engine.config.method}] mask density{where}\n{len(engine.unmasked):,} of budget "
        f"{engine.budget:,} unmasked ({used:.1f}%); cell: % of the tensor's entries"
    )


def figure_png(fig) -> bytes:
    """Render a Figure to PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_heatmap(engine: ID3Engine, path: str | os.PathLike, step: int | None = None) -> str:
    """Write the engine's mask-density heatmap to `path` as a PNG (atomically); returns the path.

    Example:
        >>> save_heatmap(trainer.engine, "outputs/mask_density.png")  # doctest: +SKIP
    """
    fig = heatmap_figure(density_grid(tensor_counts(engine)), heatmap_title(engine, step))
    data = figure_png(fig)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class MaskHeatmapCallback(TrainerCallback):
    """Saves `mask_density.png` (the heatmap above) into `output_dir` when training ends.

    `ID3Trainer` adds one automatically (whatever `report_to` says) when matplotlib is installed; remove it
    with `trainer.remove_callback(MaskHeatmapCallback)`.

    Example:
        >>> trainer.train()                                   # doctest: +SKIP
        >>> os.path.exists("outputs/mask_density.png")        # doctest: +SKIP
        True
    """

    def __init__(self, filename: str = HEATMAP_FILE) -> None:
        self.filename = filename
        self.id3: ID3Callback | None = None
        self.path: str | None = None

    def bind(self, id3: ID3Callback) -> None:
        self.id3 = id3

    def on_train_end(self, args, state, control, **kwargs):
        engine = self.id3.engine if self.id3 is not None else None
        if engine is None or not state.is_world_process_zero or not args.output_dir:
            return
        self.path = save_heatmap(engine, os.path.join(args.output_dir, self.filename), state.global_step)


def log10_scores(scores) -> np.ndarray:
    """log10 of positive, finite scores (D3 scores span many decades, so histograms use their log)."""
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values) & (values > 0)]
    return np.log10(values) if values.size else values


__all__ = [
    "HEATMAP_FILE",
    "OTHER_ROW",
    "DensityGrid",
    "MaskHeatmapCallback",
    "density_grid",
    "figure_png",
    "heatmap_figure",
    "heatmap_title",
    "log10_scores",
    "matplotlib_available",
    "parse_param_name",
    "save_heatmap",
    "tensor_counts",
]
