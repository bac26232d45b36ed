"""The study runner's planning and resume logic, and the report generator, on synthetic results (no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study"
sys.path.insert(0, str(STUDY))

import report  # noqa: E402
import run_study as study  # noqa: E402

PROTOCOL = study.Protocol()


def fake_record(run: study.Run, score: float, **extra) -> dict:
    record = {
        **run.__dict__,
        "status": "ok",
        "score": score,
        "runtime_s": 1.0,
        "protocol_settings": {"steps": 10},
    }
    record.update(extra)
    return record


def lr_records(best: dict[str, float] | None = None) -> list[dict]:
    """Every lr-phase run; the score peaks at `best[method]` (default: the middle grid value)."""
    best = best or {}
    out = []
    for run in study.lr_plan(PROTOCOL, list(study.METHODS)):
        peak = best.get(run.method, study.METHODS[run.method].lr_grid[1])
        out.append(fake_record(run, 80.0 - abs(run.lr - peak) * 1000))
    return out


def test_results_file_round_trip_keeps_keys_and_ignores_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    records = [r for r in lr_records() if r["method"] == "id3"]
    for r in records:
        study.append_result(path, r)
    with open(path, "a") as fh:
        fh.write('{"phase": "lr", "task"')  # a run killed mid-write
    loaded = study.load_results(path)
    assert len(loaded) == 3
    assert study.done_keys(loaded) == {study.run_key(r) for r in records}
    # lr 2e-3 written as JSON and read back is the same key as the planned run's
    assert study.lr_plan(PROTOCOL, ["id3"])[1].key() in study.done_keys(loaded)


def test_chosen_lrs_takes_best_held_out_score_and_smaller_lr_on_ties():
    records = lr_records({"id3": 5e-3, "full": 2e-5})
    chosen = study.chosen_lrs(records, PROTOCOL.name, list(study.METHODS))
    assert chosen["id3"] == 5e-3 and chosen["full"] == 2e-5 and chosen["static"] == 2e-3
    tie = [r | {"score": 70.0} for r in records if r["method"] == "pafi"]
    assert study.chosen_lrs(tie, PROTOCOL.name, ["pafi"]) == {"pafi": 1e-3}
    other = [r | {"protocol": "other"} for r in records]
    assert study.chosen_lrs(other, PROTOCOL.name, list(study.METHODS)) == {}


def test_main_plan_is_seed_major_and_runs_fixed_size_methods_once():
    lrs = {m: 1e-3 for m in study.METHODS}
    runs = study.main_plan(PROTOCOL, lrs, list(study.METHODS), study.TASKS, study.SEEDS)
    specs = study.METHODS.values()
    per_task = sum(len(study.BUDGETS) if s.both_budgets else 1 for s in specs if s.budgeted)
    per_task += sum(not s.budgeted for s in specs)
    cells = sum(
        seed in study.TASK_SEEDS.get(task, study.SEEDS) for task in study.TASKS for seed in study.SEEDS
    )
    assert len(runs) == per_task * cells
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)
    assert [r.task for r in runs[: per_task * len(study.TASKS) : per_task]] == list(study.TASKS)
    assert {(r.task, r.seed) for r in runs if r.task == "cola"} == {
        ("cola", s) for s in study.TASK_SEEDS["cola"]
    }
    full = [r for r in runs if r.method == "full" and r.seed == 0 and r.task == "rte"]
    assert len(full) == 1 and full[0].budget is None
    small = {r.method for r in runs if r.budget == study.BUDGETS[0]}
    assert small == {m for m, s in study.METHODS.items() if s.budgeted and s.both_budgets} >= {"id3", "fish"}
    assert {r.lora for r in runs if r.method in ("lora", "id3-lora")} == {study.LORA_RANK}


def test_main_phase_waits_for_the_lr_phase():
    args = study.parse_args(["--phase", "main"])
    methods = list(study.METHODS)
    message = study.phase_runs("main", args, PROTOCOL, lr_records()[:-1], methods)
    assert isinstance(message, str) and "id3-lora" in message
    runs = study.phase_runs("main", args, PROTOCOL, lr_records(), methods)
    assert isinstance(runs, list) and all(r.lr == study.METHODS[r.method].lr_grid[1] for r in runs)
    sens = study.phase_runs("sensitivity", args, PROTOCOL, lr_records(), methods)
    assert len(sens) == 12 and {(r.method, r.lr) for r in sens} == {("id3", 2e-3)}


def test_slow_methods_run_after_everything_else():
    plan = study.stages("all", list(study.METHODS))
    assert [(phase, "repeat" in methods) for phase, methods in plan] == [
        ("lr", False), ("main", False), ("sensitivity", False), ("lr", True), ("main", True)
    ]  # fmt: skip
    assert study.stages("main", ["repeat"]) == [("main", ["repeat"])]
    assert study.stages("lr", ["id3"]) == [("lr", ["id3"])]


def test_driver_resumes_and_stops_at_the_time_limit(tmp_path, monkeypatch):
    executed = []

    class FakeContext:
        official_ok = True

        def __init__(self, protocol, site):
            pass

    def fake_execute(run, protocol, ctx):
        executed.append(run.key())
        return fake_record(run, 75.0, rss_mb=1.0)

    monkeypatch.setattr(study, "Context", FakeContext)
    monkeypatch.setattr(study, "execute", fake_execute)
    monkeypatch.delenv("ID3_STUDY_DEADLINE", raising=False)
    results = tmp_path / "r.jsonl"
    common = ["--results", str(results), "--methods", "id3,full"]
    assert study.main(["--phase", "lr", *common]) == 0
    assert len(executed) == 6 and len(study.load_results(results)) == 6
    assert study.main(["--phase", "lr", *common]) == 0
    assert len(executed) == 6  # nothing rerun
    monkeypatch.delenv("ID3_STUDY_DEADLINE", raising=False)
    assert study.main(["--phase", "main", "--max-minutes", "0", *common]) == 0
    assert len(executed) == 6  # the time limit stops before the first run
    monkeypatch.delenv("ID3_STUDY_DEADLINE", raising=False)
    assert study.main(["--phase", "main", "--tasks", "rte", "--seeds", "0", *common]) == 0
    main_runs = [json.loads(line) for line in results.read_text().splitlines()][6:]
    assert [(r["method"], r["budget"]) for r in main_runs] == [
        ("full", None),
        ("id3", 0.0006),
        ("id3", 0.0017),
    ]
    # repeat-S has no lr runs yet: an explicit main phase fails (the two-worker script waits on that), while
    # --phase all skips the slow method's main runs once its lr runs were cut by the time limit.
    monkeypatch.delenv("ID3_STUDY_DEADLINE", raising=False)
    repeat = ["--results", str(results), "--methods", "repeat", "--tasks", "rte", "--seeds", "0"]
    assert study.main(["--phase", "main", *repeat]) == 1
    monkeypatch.delenv("ID3_STUDY_DEADLINE", raising=False)
    assert study.main(["--phase", "all", "--max-minutes", "0", *repeat]) == 0
    assert len(executed) == 9  # nothing ran for repeat


def synthetic_main(seeds=(0, 1, 2), tasks=study.TASKS) -> list[dict]:
    """ID3 one point above static everywhere; static-S's update count is twice ID3's."""
    out = []
    for seed in seeds:
        for t, task in enumerate(tasks):
            for budget in study.BUDGETS:
                for method, delta in (("id3", 1.0), ("static", 0.0), ("fish", -0.5)):
                    run = study.Run("main", task, method, budget, seed, 1e-3, 1e-3, 1.0, 0, PROTOCOL.name)
                    updates = 1000 * 100 if method != "id3" else 1000 * 50
                    extra = dict(updates_selectable=updates, unmasked=1000, steps=100, budget_entries=1000)
                    out.append(fake_record(run, 70 + t + seed * 0.1 + delta + budget, **extra))
            full = study.Run("main", task, "full", None, seed, 5e-5, 1e-3, 1.0, 0, PROTOCOL.name)
            out.append(fake_record(full, 70 + t + seed * 0.3))
    return out


def test_report_tables_tests_and_plots_on_synthetic_results(tmp_path):
    records = lr_records() + synthetic_main()
    records.append(
        {**synthetic_main()[0], "method": "random", "status": "error", "score": None, "error": "boom"}
    )
    out = tmp_path / "docs" / "RESULTS.md"
    text = report.write_report(records, out, tmp_path / "docs", PROTOCOL.name)
    assert out.read_text() == text
    assert (tmp_path / "docs" / "results_budget.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "results_updates.png").stat().st_size > 1000
    assert "**PARTIAL**" in text  # most methods and the sensitivity grid are missing
    assert "boom" in text
    # 12 (task, seed) pairs per budget, ID3 ahead in every one: the exact two-sided Wilcoxon p is 2/2**12
    line = next(row for row in text.splitlines() if row.startswith("| id3 vs static |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "12" and cells[4] == "1.00" and cells[5] == "12/0/0"
    assert float(cells[6]) == pytest.approx(2 / 2**12, rel=0.01)
    assert (
        "| ID3 makes half the parameter updates of a static mask (0.06%) | ≈ 0.5 | 0.500 | agrees |" in text
    )
    assert "id3 | 0.17% | 1,000 | 1,000 | 100 | 50,000 | 0.500 | 12 |" in text


def test_report_on_a_single_seed_says_too_little_data(tmp_path):
    records = synthetic_main(seeds=(0,), tasks=("rte",))
    text = report.write_report(records, tmp_path / "R.md", tmp_path, PROTOCOL.name)
    assert "(1/4 tasks)" in text
    assert "not enough data yet" in text  # no LoRA runs
    assert report.wilcoxon([0.5]) is None and report.wilcoxon([0.0, 0.0]) == 1.0


def test_exact_signed_rank_p_matches_scipy_without_ties():
    from scipy.stats import wilcoxon

    diffs = [0.3, -1.1, 2.5, 0.7, -0.2, 1.9, 3.3, -0.05, 1.25]
    assert report.wilcoxon(diffs) == pytest.approx(wilcoxon(diffs, method="exact").pvalue)
    assert report.wilcoxon(diffs + [0.0]) == pytest.approx(report.wilcoxon(diffs))  # zeros are dropped


def test_expected_run_time_falls_back_to_other_methods():
    records = [
        fake_record(run, 70.0) | {"runtime_s": t}
        for run, t in zip(study.lr_plan(PROTOCOL, ["full"]), (50, 80, 60))
    ]
    assert study.expected_seconds(records, "full", PROTOCOL) == 80
    assert study.expected_seconds(records, "static", PROTOCOL) == 80  # not run yet: the others' longest
    assert study.expected_seconds([], "static", PROTOCOL) == 90.0
