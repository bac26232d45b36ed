"""Multi-process scenarios for tests/test_distributed.py, several per launch (each launch costs seconds).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT train resume trainer_optim refuse desync

Scenarios, run in the order given, each writing `OUT/<scenario>_rank<r>.pt` (the unmasked set and weights):
  train   per-device batch 2 x 2 accumulation steps x 2 ranks (global batch 8), checkpoints every 3 steps,
          consistency check every 2 steps, then `save_delta` to OUT/train.delta.safetensors.
  resume  a fresh trainer resuming `train`'s checkpoint-3 and finishing its 6 steps.
  trainer_optim  as `train` with ID3Config(optimizer="trainer") (torch AdamW) instead of SparseAdamW.
  refuse  ID3Trainer on an FSDP2 (`fully_shard`) model, and with low_memory=True: records both errors.
  desync  rank 1 adds an entry to its unmasked set after step 1: the check at step 2 must stop the run.
`run(OUT, "single", per_device=8, grad_acc=1)` gives the single-process reference in the test process.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import MLP, mlp_data  # noqa: E402

from id3_callback import ID3Callback, ID3Config, ID3Trainer, save_delta  # noqa: E402
from id3_callback.distributed import get_rank  # noqa: E402

BUDGET, STEPS = 40, 6


class Desync(TrainerCallback):
    """On rank 1 only, unmask one more entry after the first step: a state the ranks no longer share."""

    def __init__(self, callback: ID3Callback) -> None:
        self.callback = callback

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and get_rank() == 1:
            unmasked = self.callback.engine.unmasked
            name = next(iter(unmasked.params))
            taken = set(unmasked.indices[name].tolist())
            unmasked.add(name, torch.tensor([next(i for i in range(10**6) if i not in taken)]))


def make_trainer(out: str, scenario: str, per_device: int, grad_acc: int, extra=(), **id3) -> ID3Trainer:
    args = TrainingArguments(
        output_dir=os.path.join(out, scenario),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=grad_acc,
        learning_rate=1e-2,
        max_steps=STEPS,
        logging_steps=2,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    torch.manual_seed(0)  # the same initial weights on every rank and in the single-process reference
    callback = ID3Callback(ID3Config(budget=BUDGET, consistency_check_steps=2, **id3))
    callbacks = [callback, *(cls(callback) for cls in extra)]
    return ID3Trainer(model=MLP(), args=args, train_dataset=mlp_data(), callbacks=callbacks)


def dump(trainer: ID3Trainer, path: str) -> None:
    unmasked = trainer.engine.unmasked
    state = {
        "indices": {n: sorted(unmasked.indices[n].tolist()) for n in unmasked.params},
        "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "steps": trainer.engine.steps_done,
    }
    torch.save(state, path)


def run(out: str, scenario: str, per_device: int = 2, grad_acc: int = 2) -> None:
    rank = int(os.environ.get("RANK", 0))  # the process group starts with the first TrainingArguments
    if scenario == "refuse":
        from torch.distributed.fsdp import fully_shard

        errors = []
        for build in (lambda: fully_shard(MLP()), lambda: None):
            try:
                model = build()
                if model is None:  # low_memory under DDP
                    make_trainer(out, scenario, per_device, grad_acc, low_memory=True)
                else:
                    args = TrainingArguments(
                        os.path.join(out, scenario), use_cpu=True, ddp_backend="gloo", report_to=[]
                    )
                    ID3Trainer(model=model, args=args, callbacks=[ID3Callback(ID3Config(budget=BUDGET))])
                errors.append("no error")
            except ValueError as err:
                errors.append(str(err))
        torch.save(errors, os.path.join(out, f"refuse_rank{rank}.pt"))
        return
    extra = [Desync] if scenario == "desync" else []
    id3 = {"optimizer": "trainer"} if scenario == "trainer_optim" else {}
    trainer = make_trainer(out, scenario, per_device, grad_acc, extra=extra, **id3)
    if scenario == "resume":
        trainer.train(resume_from_checkpoint=os.path.join(out, "train", "checkpoint-3"))
    else:
        trainer.train()
    dump(trainer, os.path.join(out, f"{scenario}_rank{rank}.pt"))
    if scenario in ("train", "single"):
        written = save_delta(trainer, os.path.join(out, f"{scenario}.delta.safetensors"))
        assert os.path.exists(written), written  # save_delta returns once rank 0's file is complete


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, *scenarios = sys.argv[1:]
    for name in scenarios:
        run(out_dir, name)
