"""The prepared GPU check runs end to end on a CPU (`--dry-run`), and `pytest --device cuda` skips cleanly
without CUDA: what CI can check of the GPU path on a machine without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run_writes_every_part(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        proc.stdout[-2000:] + proc.stderr[-2000:] + (tmp_path / "bench_device.log").read_text()[-3000:]
    )
    summary = json.loads((tmp_path / "device_check.json").read_text())
    assert summary["dry_run"] and summary["tests_exit_code"] == 0 and summary["bench_exit_code"] == 0
    assert summary["bench_parts"] == ["memory", "selection", "step"]
    bench = json.loads((tmp_path / "bench_device.json").read_text())
    assert set(bench["step"]) == {"minilm", "smollm2_135m", "llama_1b"}
    for model in bench["step"].values():
        assert {"full", "lora", "id3", "id3_low_memory"} <= set(model["variants"])
        assert all(v["step"] > 0 for v in model["variants"].values())
        assert model["variants"]["id3"]["unmasked"] > 0 and model["variants"]["id3"]["engine"] > 0
    memory = next(iter(bench["memory"].values()))
    assert memory["full"]["peak_mb"] > 0 and memory["id3_low_memory"]["peak_mb"] > 0
    rows = bench["selection"]["rows"]
    assert rows and all(r["same_entries"] and r["k"] > 0 for r in rows)  # batched == streaming
    assert (tmp_path / "device_check.md").read_text().startswith("# Device check summary")
    # the GPU-ready subset is what --device cuda collects: the device-fixture tests, and only those
    listed = (tmp_path / "tests.txt").read_text()
    assert "test_syncs.py::test_step_syncs_do_not_grow_with_tensors_or_chunks" in listed
    assert "test_cuda_ready.py::" in listed
    assert "test_core.py::" not in listed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_device_cuda_without_cuda_skips_with_a_reason():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--device",
            "cuda",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "test_syncs.py"),
            "-k",
            "bf16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "no CUDA device" in proc.stdout and "1 skipped" in proc.stdout
