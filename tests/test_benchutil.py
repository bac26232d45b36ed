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
