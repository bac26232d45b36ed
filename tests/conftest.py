"""Test settings and fixtures; the tiny models and datasets live in helpers.py (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: run only the tests that take the `device` fixture (docs/gpu.md lists them), on the GPU",
    )


def pytest_configure(config):
    if config.getoption("--device") == "cuda":
        # cuBLAS is deterministic only with a fixed workspace; must be set before CUDA initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    """With --device cuda, the tests that do not take `device` are CPU-only: deselected, not run twice."""
    if config.getoption("--device") != "cuda":
        return
    keep = [item for item in items if "device" in getattr(item, "fixturenames", ())]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


@pytest.fixture
def device(request):
    """The device of the GPU-ready tests: cpu by default, `pytest --device cuda` for the GPU (skipped with a
    reason where CUDA is absent). On CUDA, deterministic algorithms are on (atomics-based kernels such as
    index_add_ / embedding backward use their deterministic variants), so bitwise claims can be checked."""
    name = request.config.getoption("--device")
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("--device cuda: no CUDA device (torch.cuda.is_available() is False); nothing to run")
        torch.use_deterministic_algorithms(True, warn_only=True)
        yield torch.device("cuda")
        torch.use_deterministic_algorithms(False)
        return
    yield torch.device("cpu")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, busy machine the second thread's
    wake-ups cost far more than the work (measured: 10x slower training steps at load 7 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fixed_branch_costs(monkeypatch):
    """weight_grads='bounded' measures each layer's branch (GEMM rows or the bound) in a run's first steps, so
    two runs can choose differently (both exact, equal up to rounding). Tests compare runs bitwise: here
    every engine uses the fixed threshold instead. The tests of the measurement set it back to None."""
    from id3_callback import bounded_costs

    monkeypatch.setattr(bounded_costs, "FIXED_TOKENS", bounded_costs.UNMEASURED_TOKENS)


@pytest.fixture(autouse=True)
def _restore_accelerate_env():
    # transformers 4.x's TrainingArguments writes ACCELERATE_MIXED_PRECISION into os.environ and reads it
    # back as its default: after one bf16 test, every later Trainer (and each DDP worker) would run in bf16.
    saved = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    yield
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path
