#!/usr/bin/env python
"""Study v2's report: docs/RESULTS.md from benchmarks/study/results_v2.jsonl, from whatever runs are present.

    python benchmarks/study/report_v2.py
    python benchmarks/study/report_v2.py --results other.jsonl --out /tmp/RESULTS.md

Every number comes from the results file. Scores are on dev at each (task, method, budget)'s learning rate,
chosen by the held-out mean over seeds (benchmarks/study/v2.py); the paired tests pair (task, seed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import report as v1  # noqa: E402
import run_study as study  # noqa: E402
import v2  # noqa: E402
from report import fmt, fmt_p, table  # noqa: E402

from id3_callback.io import atomic_write  # noqa: E402

DEFAULT_OUT = ROOT / "docs" / "RESULTS.md"
SHARED_LRS = (1e-3, 2e-3, 5e-3)  # every sparse method's starting grid: the matched-lr comparisons


def label(method: str, budget: float | None) -> str:
    return method if budget is None else f"{method} @ {v1.budget_label(budget)}"


def v2_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("phase") == "v2"]


def dev_cells(records: list[dict], horizons: dict, method: str, budget, lr: float | None) -> dict:
    """task -> seed -> dev score for one (method, budget) at `lr` (a dict task -> lr, or one lr for all)."""
    out: dict = defaultdict(dict)
    for r in records:
        task = r["task"]
        h = horizons.get(task, {}).get("protocol")
        want = lr.get(task) if isinstance(lr, dict) else lr
        if h is None or r["protocol"] != h.name or r["method"] != method or r.get("budget") != budget:
            continue
        if (
            want is None
            or abs(r["lr"] - want) > 1e-12
            or r.get("status") != "ok"
            or r.get("dev_score") is None
        ):
            continue
        out[task][int(r["seed"])] = float(r["dev_score"])
    return {t: s for t, s in out.items() if s}


def chosen_by_config(chosen: dict) -> dict[tuple[str, float | None], dict[str, float]]:
    out: dict = defaultdict(dict)
    for (task, method, budget), lr in chosen.items():
        out[(method, budget)][task] = lr
    return out


def configs() -> list[v2.Config]:
    return [c for tier in v2.TIERS for c in tier]


def horizon_table(horizons: dict) -> str:
    rows = []
    for task, h in horizons.items():
        majority = v2.holdout_majority(task)
        for r in h["pilots"]:
            protocol = v2.protocol_named(r["protocol"])
            steps, seq = protocol.steps, protocol.max_seq_length
            ok = r.get("status") == "ok"
            learned = ok and r["score"] >= majority + v2.MARGIN
            rows.append([task, str(steps), str(seq), fmt(r.get("score")) if ok else r.get("status", "?"),
                         fmt(majority), fmt(r.get("dev_score")), fmt(r.get("dev_majority")),
                         "learns: horizon" if learned else "below the margin"])  # fmt: skip
        if h["status"] == "pending":
            rows.append([task, "—", "—", "—", fmt(majority), "—", "—", "not piloted yet (cut)"])
        elif h["status"] == "dropped":
            rows.append([task, "", "", "", "", "", "", "**dropped**: no candidate learns"])
    return table(["task", "steps", "max length", "held-out", "held-out majority", "dev", "dev majority",
                  "decision"], rows)  # fmt: skip


def lr_table(records: list[dict], horizons: dict, chosen: dict) -> str:
    """Held-out mean ± std (n) per grid value; the chosen one in bold, an edge the ladder ended at marked."""
    cells: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        h = horizons.get(r["task"], {}).get("protocol")
        if (
            h is not None
            and r["protocol"] == h.name
            and r.get("status") == "ok"
            and r.get("score") is not None
        ):
            cells[(r["task"], r["method"], r.get("budget"))][r["lr"]].append(r["score"])
    rows = []
    for task in horizons:
        for config in configs():
            key = (task, config.method, config.budget)
            if key not in cells or config.lr_from:
                continue
            pick = chosen.get(key)
            parts = []
            for lr in sorted(cells[key]):
                mean, std = v1.mean_std(cells[key][lr])
                text = f"{lr:g}: {mean:.2f} ± {std:.2f} ({len(cells[key][lr])})"
                parts.append(f"**{text}**" if pick is not None and abs(lr - pick) < 1e-12 else text)
            status = f"{pick:g}" if pick is not None else "open (runs missing)"
            rows.append([task, label(config.method, config.budget), "; ".join(parts), status])
    return table(["task", "method", "lr: held-out mean ± std (seeds)", "chosen"], rows)


def results_table(records: list[dict], horizons: dict, chosen: dict) -> tuple[str, dict]:
    by_config = chosen_by_config(chosen)
    tasks = [t for t, h in horizons.items() if h["protocol"] is not None]
    rows, scores = [], {}
    for config in configs():
        if config.lr_from:
            lrs = by_config.get((config.lr_from, config.budget), {})
        else:
            lrs = by_config.get((config.method, config.budget), {})
        cells = dev_cells(records, horizons, config.method, config.budget, lrs)
        if not cells:
            continue
        scores[(config.method, config.budget)] = cells
        row = [label(config.method, config.budget)]
        for task in tasks:
            seeds = cells.get(task)
            if not seeds:
                row.append("—")
                continue
            mean, std = v1.mean_std(list(seeds.values()))
            row.append(f"{mean:.2f} ± {std:.2f} (n={len(seeds)}, lr {lrs[task]:g})")
        rows.append(row)
    metric = {t: v1.TASK_METRIC[t] for t in tasks}
    return table(["method", *(f"{t} ({metric[t]})" for t in tasks)], rows), scores


def comparisons_table(scores: dict) -> tuple[str, dict]:
    base = ("id3", v2.BIG)
    rows, out = [], {}
    if base not in scores:
        return "_No ID3 results yet._", out
    for key, cells in scores.items():
        if key == base:
            continue
        c = v1.comparison(scores[base], cells)
        out[key] = c
        if c["n"]:
            rows.append([label(*base) + " vs " + label(*key), str(c["n"]), fmt(c["a_mean"]), fmt(c["b_mean"]),
                         fmt(c["mean_diff"]), f"{c['wins']}/{c['ties']}/{c['losses']}", fmt_p(c["p"])])  # fmt: skip
    return table(["comparison", "pairs", "ID3", "other", "Δ", "W/T/L", "p (Wilcoxon)"], rows), out


def matched_lr_table(records: list[dict], horizons: dict) -> tuple[str, dict]:
    """The sparse methods at each shared learning rate (dev mean over seeds), and ID3's paired tests there."""
    methods = [c for c in configs() if c.budget == v2.BIG and c.grid == SHARED_LRS]
    rows, tests = [], {}
    for lr in SHARED_LRS:
        cells = {c.method: dev_cells(records, horizons, c.method, c.budget, lr) for c in methods}
        for task in horizons:
            row = [f"{lr:g}", task]
            for c in methods:
                seeds = cells[c.method].get(task)
                row.append(f"{statistics.fmean(seeds.values()):.2f} ({len(seeds)})" if seeds else "—")
            if any(x != "—" for x in row[2:]):
                rows.append(row)
        for other in ("static", "official-id3"):
            tests[(lr, other)] = v1.comparison(cells["id3"], cells[other])
    test_rows = [[f"{lr:g}", f"id3 vs {other}", str(c["n"]), fmt(c["mean_diff"]), fmt_p(c["p"])]
                 for (lr, other), c in tests.items() if c["n"]]  # fmt: skip
    text = table(["lr", "task", *(c.method for c in methods)], rows)
    text += "\n\nPaired over (task, seed) at the same lr:\n\n"
    text += table(["lr", "comparison", "pairs", "Δ", "p"], test_rows) if test_rows else "_no pairs yet_"
    return text, tests


def updates_table(records: list[dict]) -> tuple[str, float | None]:
    acc: dict = defaultdict(list)
    for r in records:
        if (
            r.get("status") == "ok"
            and r.get("budget") is not None
            and r.get("updates_selectable") is not None
        ):
            acc[(r["method"], r["budget"], r["protocol"])].append(r)
    rows, ratio = [], None
    for (method, budget, protocol), runs in sorted(acc.items(), key=str):
        static = acc.get(("static", budget, protocol))
        if not static:
            continue
        updates = statistics.fmean(r["updates_selectable"] for r in runs)
        r_static = updates / statistics.fmean(r["updates_selectable"] for r in static)
        unmasked = statistics.fmean(r["unmasked"] for r in runs)
        over = [r["overshoot"] for r in runs if r.get("overshoot") is not None]
        if method == "id3" and budget == v2.BIG:
            ratio = r_static
        rows.append([label(method, budget), protocol, f"{statistics.fmean(r['budget_entries'] for r in runs):,.0f}",
                     f"{unmasked:,.0f}" + (f" (overshoot {statistics.fmean(over):+,.0f})" if over else ""),
                     f"{r_static:.3f}", str(len(runs))])  # fmt: skip
    return table(["method", "protocol", "B", "final unmasked", "updates ÷ static-S", "runs"], rows), ratio


def verdicts(comps: dict, ratio: float | None, scores: dict) -> str:
    lines = ["| claim | paper (DeBERTa-v3-base) | here (MiniLM, v2) | verdict |", "|---|---|---|---|"]

    def row(claim, paper, c, verdict_fn):
        here = (f"{fmt(c.get('a_mean'))} vs {fmt(c.get('b_mean'))} (Δ {fmt(c.get('mean_diff'))}, "
                f"n={c.get('n', 0)}, p={fmt_p(c.get('p'))})") if c else "—"  # fmt: skip
        lines.append(f"| {claim} | {paper} | {here} | {verdict_fn(c) if c else 'not enough data yet'} |")

    row("ID3 at 0.17% beats full fine-tuning", f"{v1.PAPER['id3@0.0017']} vs {v1.PAPER['full']}",
        comps.get(("full", None)), v1.verdict_at_least)  # fmt: skip
    row("ID3 at 0.06% matches full fine-tuning", f"{v1.PAPER['id3@0.0006']} vs {v1.PAPER['full']}",
        v1.comparison(scores[("id3", v2.SMALL)], scores[("full", None)]) if ("id3", v2.SMALL) in scores
        and ("full", None) in scores else None, v1.verdict_equal)  # fmt: skip
    statics = {m: comps.get((m, v2.BIG)) for m in ("static", "fish", "pafi", "random")}
    statics = {m: c for m, c in statics.items() if c and c["n"]}
    if statics:
        best = max(statics, key=lambda m: statics[m]["b_mean"])
        row(f"ID3 at 0.17% beats the best static baseline (here: {best}, of {sorted(statics)})",
            f"{v1.PAPER['id3@0.0017']} vs FISH {v1.PAPER['fish']}", statics[best], v1.verdict_at_least)  # fmt: skip
    else:
        row("ID3 at 0.17% beats the best static baseline", "yes", None, v1.verdict_at_least)
    row("incremental beats static (ID3 vs static-S, each at its chosen lr)", "yes (the paper's ablation)",
        comps.get(("static", v2.BIG)), v1.verdict_at_least)  # fmt: skip
    lora = (v1.comparison(scores[("id3-lora", v2.BIG)], scores[("lora", None)])
            if ("id3-lora", v2.BIG) in scores and ("lora", None) in scores else None)  # fmt: skip
    row("ID3 on LoRA at 0.17% matches dense LoRA", f"{v1.PAPER['lora']} vs {v1.PAPER['lora']}", lora,
        v1.verdict_equal)  # fmt: skip
    row("this package's ID3 equals the official toolkit's (each at its chosen lr)", "— (replication check)",
        comps.get(("official-id3", v2.BIG)), v1.verdict_equal)  # fmt: skip
    front = comps.get(("id3-front", v2.BIG))
    row("uniform schedule vs all of the budget in the first 25% of steps (ID3's lr)",
        "the paper uses the uniform schedule", front, v1.verdict_at_least)  # fmt: skip
    lines.append(
        f"| ID3 makes half the parameter updates of a static mask (0.17%) | ≈ 0.5 | {fmt(ratio, 3)} | "
        + (
            "not enough data yet"
            if ratio is None
            else ("agrees" if abs(ratio - 0.5) < 0.05 else "does NOT agree")
        )
        + " |"
    )
    return "\n".join(lines)


def progress(records: list[dict], horizons: dict) -> str:
    done = defaultdict(int)
    for r in records:
        done[(r["task"], r["method"], r.get("budget"), r["protocol"])] += 1
    rows = []
    for number, tier in enumerate(v2.TIERS, 1):
        for task, h in horizons.items():
            if h["protocol"] is None:
                continue
            parts = []
            for c in tier:
                n = done.get((task, c.method, c.budget, h["protocol"].name), 0)
                planned = len(v2.SEEDS) * max(len(c.grid), 1)
                parts.append(f"{label(c.method, c.budget)} {n}/{planned}+")
            rows.append([str(number), task, ", ".join(parts)])
    return table(["tier", "task", "runs done / starting grid x seeds (+ edge extensions)"], rows)


def remaining_hours(records: list[dict], ready: list) -> tuple[float, dict[str, float]]:
    """Worker-hours the ready runs need at the measured median run time of their (method, protocol), else of
    their method, else of every run; and those medians per method (seconds).

    Example:
        >>> done = [{"status": "ok", "method": "id3", "protocol": "p", "runtime_s": 100.0}]
        >>> run = study.Run("v2", "sst2", "id3", 0.0017, 0, 1e-3, 1e-3, 1.0, 0, "p")
        >>> remaining_hours(done, [run, run])
        (0.05555555555555555, {'id3': 100.0})
    """
    ok = [r for r in records if r.get("status") == "ok" and r.get("runtime_s")]
    by_pair, by_method = defaultdict(list), defaultdict(list)
    for r in ok:
        by_pair[(r["method"], r["protocol"])].append(r["runtime_s"])
        by_method[r["method"]].append(r["runtime_s"])
    overall = statistics.median(r["runtime_s"] for r in ok) if ok else 0.0
    seconds = 0.0
    for run in ready:
        times = by_pair.get((run.method, run.protocol)) or by_method.get(run.method)
        seconds += statistics.median(times) if times else overall
    return seconds / 3600, {m: statistics.median(t) for m, t in sorted(by_method.items())}


def remaining_text(records: list[dict], state: dict) -> str:
    hours, medians = remaining_hours(records, state["ready"])
    if not state["ready"]:
        return ""
    per = ", ".join(f"{m} {s / 60:.1f}" for m, s in medians.items())
    pending = [t for t, h in state["horizons"].items() if h["status"] == "pending"]  # not the dropped
    return (
        f"Measured median minutes per run (one thread, this machine, loaded): {per or 'none yet'}. At these, the "
        f"ready runs need about {hours:.1f} more worker-hours ({hours / 2:.1f} hours of two workers)"
        + (f"; {', '.join(pending)} are not counted until their pilots choose a horizon." if pending else ".")
    )


def cuts_text(cuts: list[dict]) -> str:
    """The grids the planner's cut rule dropped, named (v2.py's docstring gives the rule).

    Example:
        >>> cuts_text([{"task": "cola", "method": "id3", "budget": 0.0006}])[:42]
        'Cut by rule (not run): id3 @ 0.06% on cola'
    """
    if not cuts:
        return ""
    names = ", ".join(f"{label(c['method'], c['budget'])} on {c['task']}" for c in cuts)
    return (
        f"Cut by rule (not run): {names}. Each method's 0.17% grid on that task was flat over its whole "
        "learning-rate ladder (the same held-out mean at every value; on CoLA, MCC 0: one class predicted), so "
        "its 0.06% grid is not run; the 0.06% comparisons pair the other tasks only."
    )


def write_report(records: list[dict], out: Path, smoke: bool = False) -> str:
    records = v2_records(records)
    state = v2.plan(records, smoke=smoke)
    horizons, chosen = state["horizons"], state["chosen"]
    results, scores = results_table(records, horizons, chosen)
    comps_text, comps = comparisons_table(scores)
    matched_text, _ = matched_lr_table(records, horizons)
    updates_text, ratio = updates_table(records)
    ok = [r for r in records if r.get("status") == "ok"]
    errors = [r for r in records if r.get("status") != "ok"]
    times = sorted(r["started"] for r in records if r.get("started"))
    runtime = sum(r.get("runtime_s", 0) for r in records) / 3600
    versions = ok[-1].get("versions", {}) if ok else {}
    host = ok[-1].get("host", {}) if ok else {}
    cpus = Counter(r.get("host", {}).get("cpu", "?") for r in ok)  # sessions may land on other machines
    cpu_text = ", ".join(f"{cpu} ({n} runs)" for cpu, n in cpus.most_common()) or "?"
    commits = sorted({r["versions"].get("git_commit") for r in ok if r.get("versions")} - {None})
    complete = not state["ready"] and not state["blocked"]
    text = f"""# ID3 on real data: study v2 (all-MiniLM-L6-v2, GLUE)

_Generated {datetime.now(UTC).isoformat(timespec="minutes")} by `python benchmarks/study/report_v2.py` from
`benchmarks/study/results_v2.jsonl` ({len(records)} runs, {len(ok)} ok, {len(errors)} failed)._

{"Complete." if complete else "**Partial: the study was cut by machine time (below: what ran, what did not, and why).**"}
The earlier 100-step protocol (v1), which could not rank the methods, is kept as
[RESULTS_v1.md](RESULTS_v1.md).

## Protocol v2

Fixed in `benchmarks/study/v2.py` before the first run (its docstring has the whole protocol):

- **Horizon per task**: candidates {", ".join(f"{t} {list(v)}" for t, v in v2.HORIZONS.items())} (steps, max
  length), tried in order; the first at which full fine-tuning (lr {v2.PILOT_LR:g}, seed 0) is at least
  {v2.MARGIN:g} points above the majority class on the held-out slice is the task's horizon. A task none of them
  teaches is dropped from the paired tests, its pilot numbers shown.
- **Every run** trains on 90% of the training rows (SST-2: of its fixed 8,000-row subset), is scored on the
  other 10% (held-out: the learning rate is chosen by it) and on the full dev set (reported). Dev never
  influences a choice, and each grid run doubles as a final run.
- **Learning rate** per (task, method, budget): the best held-out mean over seeds 0, 1, 2 (ties: the smaller);
  a best at a grid edge adds the next value of the method's ladder on that side (sparse methods
  {list(v2.SPARSE_LADDER)}, full FT {list(v2.FULL_LADDER)}, LoRA {list(v2.LORA_LADDER)}) until it is interior or the ladder ends.
  Two amendments, both made on held-out scores alone: a flat grid (every value the same mean, as CoLA's sparse
  methods at MCC 0) grows on both sides until it is not flat (2026-12-02); the sparse and LoRA ladders each
  gained a value at the top, 5e-2 and 2e-2, after five grids had their best at the old top (2026-12-06).
  The sparse methods share their starting grid {list(SHARED_LRS)}: the matched-lr table compares them there.
- Batch 16, linear schedule with 6% warmup, weight decay 0, fp32; the classifier head is trained densely outside
  the budget by every method; budgets are fractions of MiniLM's 22.7M pretrained entries (0.17% = 38,612).
- **Tiers** (the order runs are made in, over every task with a horizon, so a cut by time falls on a tier
  boundary): 1 full FT, ID3, static-S, FISH at 0.17%; 2 official ID3, LoRA, ID3 on LoRA, BitFit, PaFi,
  random at 0.17%; 3 the scheduler ablation (ID3 with `scheduler="front_loaded"`: the whole budget in the
  first 25% of steps, at ID3's chosen lr); 4 ID3, static-S, FISH at 0.06%, repeat-S at 0.17%; 5 the rest at
  0.06%. SST-2's and MRPC's pilots run first, CoLA's and RTE's after tier 1.
- **Expected cost**, written before the first run: about 145 CPU-hours for the whole plan at each task's
  first candidate horizon, 330 at the longest (from v1's single-thread step times on this shared machine).

## Progress and the cut

Runs from {times[0] if times else "—"} to {times[-1] if times else "—"} (UTC), {runtime:.1f} worker-hours, one or
two single-thread workers on {cpu_text}, {host.get("cores", "?")} cores, shared with development
work. Software: torch {versions.get("torch")}, transformers {versions.get("transformers")}, peft
{versions.get("peft")}, selective-optimizers {versions.get("selective-optimizers")}; id3-callback at git
{", ".join(commits) or "—"}.

{progress(records, horizons)}

Runs ready but not made when the study stopped: {len(state["ready"])}; waiting on them: {state["blocked"]}.
{remaining_text(records, state)}
{cuts_text(state["cuts"])}
The GPU device mode (`benchmarks/study/device_v2.sh`) runs the same plan, in the same order, with N workers on
one GPU; no GPU was lent to this project, so it has not run.

## Horizons (pilots)

{horizon_table(horizons)}

## Learning rates (held-out)

{lr_table(records, horizons, chosen)}

## Dev scores at the chosen learning rates (mean ± std over seeds)

{results}

## ID3 against every other method (paired over (task, seed), each at its chosen lr)

{comps_text}

## Matched learning rates (dev mean over seeds, number of seeds in brackets)

{matched_text}

## Parameter updates

{updates_text}

## What agrees with the paper and what does not (re-derived from v2)

'Significant' means a paired two-sided Wilcoxon signed-rank test over (task, seed) with p < 0.05; with n
pairs the smallest possible p is 2/2^n (n = 6, two tasks x three seeds: 0.031), so only a gap of one sign
in every pair can reach it at small n.
The paper's numbers are DeBERTa-v3-base GLUE averages under much longer training: compare direction only.

{verdicts(comps, ratio, scores)}

## Failed runs

{chr(10).join(f"- {r['task']} {r['method']} {r.get('budget')} seed {r['seed']} lr {r['lr']:g}: {r.get('error', '')[:200]}" for r in errors) or "None."}
"""
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=v2.RESULTS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--smoke", action="store_true", help="a results file of `v2.py --smoke` runs")
    args = p.parse_args(argv)
    write_report(study.load_results(args.results), args.out, args.smoke)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
