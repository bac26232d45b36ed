"""What differs between the supported transformers versions (4.48 to 5.x), tested on whichever is installed.

`.ci/run` runs this file on the newest transformers, on 4.57.x and on the declared floor. 4.x Trainers have
no `_clip_grad_norm` hook: they clip inline with `accelerator.clip_grad_norm_` over dense p.grad, so ID3
clips in `training_step` and the inline call returns the engine's norm (`ID3TrainerMixin._inline_clip`).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import changed_entries, snapshot, tiny_bert, token_data, training_args
from transformers import Trainer, TrainerCallback

import id3_callback.selection as sel
import id3_callback.trainer as trainer_mod
from id3_callback import ID3Callback, ID3Config, ID3Trainer

INLINE = trainer_mod.trainer_clips_inline()


class GradLayouts(TrainerCallback):
    """Records, before each optimizer step, the word embedding's gradient layout and whether it exists."""

    def __init__(self, model) -> None:
        self.weight = model.bert.embeddings.word_embeddings.weight
        self.layouts = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.layouts.append(None if self.weight.grad is None else self.weight.grad.layout)


class TorchClipping(ID3Trainer):
    """The reference: the Trainer's own torch clipping over dense gradients, as if ID3 did not clip."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clips_inline = False  # 4.x: leave the inline accelerator.clip_grad_norm_ alone

    def _clip_grad_norm(self, model):  # 5.x
        return Trainer._clip_grad_norm(self, model)

    def _get_grad_norm(self, model, grad_norm=None):
        return Trainer._get_grad_norm(self, model, grad_norm)


class SimulatedInline(ID3Trainer):
    """On 5.x, a 4.x Trainer: the clipping hook does what 4.x's inner loop does inline."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clips_inline = True

    def _clip_grad_norm(self, model):
        return self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)


def run(cls, tmp_path, config: ID3Config, **args):
    model = tiny_bert()
    before = snapshot(model)
    probe = GradLayouts(model)
    trainer = cls(
        model=model,
        args=training_args(tmp_path / f"{cls.__name__}{config.low_memory}", weight_decay=0.01, **args),
        train_dataset=token_data(n=48),
        callbacks=[ID3Callback(config), probe],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "falls back to the standard mode" warning
        trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return trainer, before, probe.layouts, norms


@pytest.mark.parametrize(
    "cls",
    [
        ID3Trainer,
        pytest.param(
            SimulatedInline, marks=pytest.mark.skipif(INLINE, reason="this Trainer clips inline itself")
        ),
    ],
)
@pytest.mark.parametrize("low_memory", [False, True])
def test_clipping_keeps_row_sparse_and_low_memory_gradients_and_matches_torch(
    tmp_path, monkeypatch, cls, low_memory
):
    monkeypatch.setattr(sel, "ROW_SPARSE_MIN_ENTRIES", 1)  # the tiny embedding takes the sparse path
    dense = ID3Config(budget=150, sparse_embedding_grads=False)
    ref, _, ref_layouts, ref_norms = run(TorchClipping, tmp_path, dense, max_grad_norm=0.05, logging_steps=1)
    config = ID3Config(budget=150, low_memory=low_memory)
    trainer, before, layouts, norms = run(cls, tmp_path, config, max_grad_norm=0.05, logging_steps=1)
    # the modes engaged: gradients never dense before the optimizer step
    assert trainer.engine.sparse_grads and trainer.engine.low_memory == low_memory
    assert set(layouts) == ({None} if low_memory else {torch.sparse_coo})
    assert set(ref_layouts) == {torch.strided}
    # clipped once, by max_grad_norm, with the norm torch computes over dense gradients
    assert len(norms) == len(ref_norms) == 6 and min(ref_norms) > 0.05  # the clip binds on every step
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert trainer.engine.unmasked.fingerprint() == ref.engine.unmasked.fingerprint()
    for (name, a), b in zip(trainer.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    changed = changed_entries(before, trainer.model)
    for name, idx in changed.items():
        allowed = trainer.engine.unmasked.indices[name] if name in trainer.engine.unmasked.params else []
        assert set(idx.tolist()) <= set(torch.as_tensor(allowed).tolist()), f"{name}: masked entries moved"


def test_inline_hook_passes_other_calls_through(tmp_path):
    # after training, accelerator.clip_grad_norm_ (hooked on 4.x, or by SimulatedInline) clips as before
    trainer = run(
        ID3Trainer if INLINE else SimulatedInline, tmp_path, ID3Config(budget=150), max_grad_norm=0.05
    )[0]
    assert getattr(trainer.accelerator.clip_grad_norm_, "_id3_hook", False)
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    norm = trainer.accelerator.clip_grad_norm_([p], 1.0)
    assert float(norm) == pytest.approx(6.0) and float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_momentum_sgd_passed_as_optimizer_moves_only_unmasked_entries(tmp_path):
    # 4.x ignores optim_args for optim="sgd"; an SGD passed through `optimizers=` works on every version
    model = tiny_bert()
    before = snapshot(model)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)
    trainer = ID3Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=token_data(),
        optimizers=(sgd, None),
        callbacks=[ID3Callback(ID3Config(budget=200, optimizer="trainer"))],
    )
    trainer.train()
    assert trainer.optimizer.optimizer.param_groups[0]["momentum"] == 0.9
    changed = changed_entries(before, model)
    engine = trainer.engine
    for name, idx in changed.items():
        allowed = set(engine.unmasked.indices[name].tolist()) if name in engine.unmasked.params else set()
        assert set(idx.tolist()) <= allowed, f"{name}: masked entries moved"
    assert sum(v.numel() for v in changed.values()) > 100


def test_optimizer_state_saved_on_cpu_loads_with_an_indexed_cpu_device(tmp_path):
    # CPU DDP on 4.57 loads the optimizer with map_location=torch.device("cpu", rank)
    path = tmp_path / "state.pt"
    torch.save({"exp_avg": torch.arange(5.0)}, path)
    trainer_mod._allow_indexed_cpu_locations()
    loaded = torch.load(path, map_location=torch.device("cpu", 0), weights_only=True)
    assert torch.equal(loaded["exp_avg"], torch.arange(5.0)) and loaded["exp_avg"].device.type == "cpu"
