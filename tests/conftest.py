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


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path
