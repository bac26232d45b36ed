"""The A/B helper the low-memory benchmarks time their modes with (`benchmarks/benchutil.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import benchutil  # noqa: E402


def test_alternate_warms_up_then_swaps_the_order_every_pair():
    calls = []
    cost = {"a": 2.0, "b": 4.0}

    def step(inputs, mode):
        calls.append((inputs["i"], mode))
        return cost[mode] * (1 + inputs["i"])  # drift over time hits both modes of a pair alike

    result = benchutil.alternate(step, ("a", "b"), [{"i": i} for i in range(5)])
    assert calls[:2] == [(0, "a"), (0, "b")]  # one warm-up each, not timed
    assert calls[2:] == [(1, "a"), (1, "b"), (2, "b"), (2, "a"), (3, "a"), (3, "b"), (4, "b"), (4, "a")]
    assert result["times"] == {"a": [4.0, 6.0, 8.0, 10.0], "b": [8.0, 12.0, 16.0, 20.0]}
    assert result["ratio"] == pytest.approx(0.5) and result["ratio_range"] == [0.5, 0.5]
    assert result["a_s"] == 7.0 and result["b_s"] == 14.0
    text = benchutil.ab_markdown(
        {
            **result,
            "setting": {
                "model": "m",
                "batch": 2,
                "seq": 8,
                "budget_fraction": 0.01,
                "threads": 2,
                "pairs": 4,
            },
            "machine": {},
        },
        ("a", "b"),
        ("first", "second"),
        "mode",
    )
    assert "| first | 7.00 | 0.50 |" in text and "x b = median of the per-pair ratios" in text


def test_commit_ab_ratios_are_per_step_and_per_tree():
    import bench_ab_commits

    def times(full, id3):
        return {"full": {"step": full}, "id3": {"step": id3}}

    steps = {
        "base": [times(100.0, 110.0), times(200.0, 180.0), times(300.0, 330.0)],
        "head": [times(100.0, 121.0), times(100.0, 90.0), times(330.0, 330.0)],
    }
    out = bench_ab_commits.summarize(steps, ["full", "id3"])
    # head / base of the same step: 1.1, 0.5, 1.0 for id3; 1.0, 0.5, 1.1 for full
    assert out["id3"]["head_over_base"] == pytest.approx(1.0)
    assert out["full"]["head_over_base"] == pytest.approx(1.0)
    assert out["id3"]["base_ms"] == 180.0 and out["id3"]["head_ms"] == 121.0
    # each tree's own x-full ratio, per step then the median: base 1.1, 0.9, 1.1; head 1.21, 0.9, 1.0
    assert out["id3"]["base_x_full"] == pytest.approx(1.1)
    assert out["id3"]["head_x_full"] == pytest.approx(1.0)
    assert out["full"]["head_x_full"] == 1.0
