"""Test settings and fixtures; the tiny models and datasets live in helpers.py (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, busy machine the second thread's
    wake-ups cost far more than the work (measured: 10x slower training steps at load 7 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
