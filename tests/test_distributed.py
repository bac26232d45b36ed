"""Multi-process training: DDP on CPU (gloo) agrees across ranks and with one process; refusals; the check.

One `torchrun` launch (tests/ddp_worker.py) runs every 2-process scenario in turn; the last one desynchronises
the ranks on purpose, so the launch itself must fail, with the consistency check's message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import ddp_worker
import pytest
import torch
from helpers import MLP, mlp_data, training_args
from torch import nn

from id3_callback import ID3Callback, ID3Config, ID3Engine, ID3Trainer, apply_delta
from id3_callback.distributed import check_consistency, check_distributed_support, state_digest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ["train", "resume", "trainer_optim", "refuse", "desync"]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / "tests" / "ddp_worker.py"), str(out), *SCENARIOS]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return out, proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, batch 8 (the DDP run: 2 ranks x batch 2 x 2 accumulation steps)."""
    out = tmp_path_factory.mktemp("single")
    ddp_worker.run(str(out), "single", per_device=8, grad_acc=1)
    return torch.load(out / "single_rank0.pt")


def result(launch, name: str) -> dict:
    out, _, log = launch
    path = out / f"{name}.pt"
    assert path.exists(), f"{name} was not written; worker log tail:\n{log[-4000:]}"
    return torch.load(path)


def test_ranks_agree_and_match_one_process(launch, single):
    rank0, rank1 = result(launch, "train_rank0"), result(launch, "train_rank1")
    assert rank0["steps"] == ddp_worker.STEPS
    assert sum(len(i) for i in rank0["indices"].values()) == ddp_worker.BUDGET
    assert rank0["indices"] == rank1["indices"]
    for name, weight in rank0["weights"].items():
        assert torch.equal(weight, rank1["weights"][name]), name  # DDP replicas stay bit-identical
    # Same global batch, so the same selection; weights differ only by float summation order.
    assert rank0["indices"] == single["indices"]
    for name, weight in rank0["weights"].items():
        torch.testing.assert_close(weight, single["weights"][name], rtol=0, atol=1e-6)


def test_delta_from_rank0_round_trips(launch):
    out = launch[0]
    trained = result(launch, "train_rank0")["weights"]
    assert not list(out.glob(".tmp-*")), "a temporary delta file was left behind"
    torch.manual_seed(0)  # the worker's initial weights
    base = MLP()
    changed = sum(int((p != trained[n]).sum()) for n, p in base.named_parameters())
    assert changed > ddp_worker.BUDGET // 2
    apply_delta(base, out / "train.delta.safetensors")
    for name, p in base.named_parameters():
        assert torch.equal(p.detach(), trained[name]), name


def test_resume_under_ddp_matches_uninterrupted_run(launch):
    full = result(launch, "train_rank0")
    for rank in (0, 1):
        resumed = result(launch, f"resume_rank{rank}")
        assert resumed["indices"] == full["indices"]
        for name, weight in full["weights"].items():
            assert torch.equal(resumed["weights"][name], weight), (rank, name)


def test_torch_adamw_under_ddp_keeps_ranks_identical(launch):
    rank0, rank1 = result(launch, "trainer_optim_rank0"), result(launch, "trainer_optim_rank1")
    assert rank0["indices"] == rank1["indices"]
    assert sum(len(i) for i in rank0["indices"].values()) == ddp_worker.BUDGET
    for name, weight in rank0["weights"].items():
        assert torch.equal(weight, rank1["weights"][name]), name


def test_fsdp_model_and_low_memory_refused_under_ddp(launch):
    for rank in (0, 1):
        fsdp_error, low_memory_error = result(launch, f"refuse_rank{rank}")
        assert "does not support FSDP" in fsdp_error and "Train with DDP" in fsdp_error
        assert "low_memory=True does not work with 2 processes" in low_memory_error


def test_desynchronised_rank_stops_the_run(launch):
    _, returncode, log = launch
    assert returncode != 0
    assert "ID3 state diverged across ranks at step 2" in log, log[-4000:]
    assert "rank 1 differs from rank 0 in: unmasked-set hash" in log
    assert "dropout masks per rank are fine" in log


# ---------------------------------------------------------------------------------------- single process
def test_digest_sees_set_and_value_changes_but_not_order():
    def engine_with(order):
        torch.manual_seed(0)
        engine = ID3Engine(nn.Linear(6, 4), ID3Config(budget=8))
        engine.unmasked.add("weight", torch.tensor(order))
        return engine

    a, b = engine_with([3, 7, 11]), engine_with([11, 3, 7])
    assert torch.equal(state_digest(a), state_digest(b))
    b.unmasked.add("bias", torch.tensor([0]))
    assert not torch.equal(state_digest(a)[2:3], state_digest(b)[2:3])
    c = engine_with([3, 7, 11])
    with torch.no_grad():
        w = c.unmasked.params["weight"].view(-1)
        w[7] = torch.nextafter(w[7], torch.tensor(float("inf")))  # one ulp
    digest_a, digest_c = state_digest(a), state_digest(c)
    assert torch.equal(digest_a[:3], digest_c[:3]) and digest_a[3] != digest_c[3]
    check_consistency(a)  # no process group: a no-op


def fake_trainer(**overrides):
    args = SimpleNamespace(world_size=1, fsdp=None)
    fields = dict(
        model=nn.Linear(2, 2), is_fsdp_enabled=False, is_distributed_loading_by_transformers=False, args=args
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_refusals_before_training():
    check_distributed_support(fake_trainer(), ID3Config(low_memory=True))  # one process: allowed
    with pytest.raises(ValueError, match="does not support FSDP or tensor parallelism"):
        check_distributed_support(fake_trainer(is_fsdp_enabled=True), ID3Config())
    with pytest.raises(ValueError, match="tp_plan"):
        check_distributed_support(fake_trainer(is_distributed_loading_by_transformers=True), ID3Config())
    ddp = fake_trainer(args=SimpleNamespace(world_size=2, fsdp=None))
    check_distributed_support(ddp, ID3Config())
    with pytest.raises(ValueError, match="low_memory=False"):
        check_distributed_support(ddp, ID3Config(low_memory=True))


def test_deepspeed_refused(tmp_path, monkeypatch):
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def with_deepspeed(self):
        original(self)
        self.is_deepspeed_enabled = True  # what a DeepSpeed config would set (deepspeed is not installed)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", with_deepspeed)
    with pytest.raises(ValueError, match="does not support DeepSpeed: ZeRO partitions"):
        ID3Trainer(
            model=MLP(), args=training_args(tmp_path), train_dataset=mlp_data(), callbacks=[ID3Callback()]
        )
