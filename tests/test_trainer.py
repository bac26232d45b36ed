"""ID3 through the Hugging Face Trainer: masking, optimizers, resume, accumulation, precision, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    MLP,
    changed_entries,
    mlp_data,
    snapshot,
    tiny_bert,
    tiny_llama,
    tiny_t5,
    token_data,
    training_args,
)
from transformers import Trainer, TrainingArguments

from id3_callback import ID3Callback, ID3Config, ID3Seq2SeqTrainer, ID3Trainer, SparseAdamW


def sgd_reads_optim_args() -> bool:
    # transformers 4.x ignores optim_args for optim="sgd" (no momentum); tests/test_versions.py passes a
    # momentum SGD through `optimizers=` instead, on every version.
    args = TrainingArguments("unused", optim="sgd", optim_args="momentum=0.9", report_to=[])
    return "momentum" in Trainer.get_optimizer_cls_and_kwargs(args)[1]


needs_sgd_optim_args = pytest.mark.skipif(
    not sgd_reads_optim_args(), reason="this transformers ignores optim_args for optim='sgd'"
)


def train(model, data, tmp_path, config=None, **args):
    callback = ID3Callback(config or ID3Config(budget=40))
    trainer = ID3Trainer(
        model=model, args=training_args(tmp_path, **args), train_dataset=data, callbacks=[callback]
    )
    trainer.train()
    return trainer


def assert_only_unmasked_changed(trainer, before):
    """Every entry outside the unmasked set is bit-identical; the set holds exactly the budget."""
    engine = trainer.engine
    assert len(engine.unmasked) == engine.budget
    changed = changed_entries(before, trainer.model)
    for name, idx in changed.items():
        allowed = set(engine.unmasked.indices[name].tolist()) if name in engine.unmasked.params else set()
        assert set(idx.tolist()) <= allowed, f"{name}: masked entries moved"
    assert sum(v.numel() for v in changed.values()) > 0.5 * engine.budget  # and training did something


@pytest.mark.parametrize(
    "optim, id3_optimizer, extra",
    [
        ("adamw_torch", "sparse_adamw", {}),
        ("adamw_torch", "trainer", {}),
        ("adamw_torch_fused", "trainer", {}),
        pytest.param("sgd", "trainer", {"optim_args": "momentum=0.9"}, marks=needs_sgd_optim_args),
        ("adafactor", "trainer", {}),
    ],
)
def test_masked_weights_never_move_with_weight_decay(tmp_path, optim, id3_optimizer, extra):
    model = tiny_bert()
    before = snapshot(model)
    config = ID3Config(budget=200, optimizer=id3_optimizer)
    trainer = train(model, token_data(), tmp_path, config, optim=optim, weight_decay=0.1, **extra)
    if id3_optimizer == "sparse_adamw":
        assert isinstance(trainer.optimizer.optimizer, SparseAdamW)
    assert_only_unmasked_changed(trainer, before)


@needs_sgd_optim_args
def test_sgd_momentum_really_has_momentum(tmp_path):
    trainer = train(
        MLP(), mlp_data(), tmp_path, ID3Config(optimizer="trainer"), optim="sgd", optim_args="momentum=0.9"
    )
    assert trainer.optimizer.optimizer.param_groups[0]["momentum"] == 0.9


def test_weight_decay_reaches_unmasked_entries(tmp_path):
    """Decay is not dropped, only confined: with lr-only decay (zero gradients) unmasked entries shrink."""
    model = MLP()
    trainer = train(model, mlp_data(), tmp_path, ID3Config(budget=40, optimizer="trainer"), weight_decay=0.5)
    groups = trainer.optimizer.optimizer.param_groups
    assert all(g["weight_decay"] == 0.0 for g in groups)  # moved out of the optimizer by the guard


@pytest.mark.parametrize("factory", [tiny_llama, MLP])
def test_other_architectures(tmp_path, factory):
    model = factory()
    data = token_data(kind="lm") if factory is tiny_llama else mlp_data()
    before = snapshot(model)
    trainer = train(model, data, tmp_path, ID3Config(budget=100), weight_decay=0.1)
    assert_only_unmasked_changed(trainer, before)


def test_seq2seq_trainer(tmp_path):
    from transformers import Seq2SeqTrainingArguments

    model = tiny_t5()
    before = snapshot(model)
    args = Seq2SeqTrainingArguments(
        **training_args(tmp_path).to_dict() | {"output_dir": str(tmp_path / "s2s")}
    )
    trainer = ID3Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=token_data(kind="s2s"),
        callbacks=[ID3Callback(ID3Config(budget=100))],
    )
    trainer.train()
    assert_only_unmasked_changed(trainer, before)


def test_logs_budget_new_entries_and_selection_time(tmp_path):
    trainer = train(MLP(), mlp_data(), tmp_path, ID3Config(budget=60), max_steps=6, logging_steps=2)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["id3/unmasked"] for entry in logs] == [20, 40, 60]
    assert all(entry["id3/new_per_step"] == 10 for entry in logs)
    assert all(entry["id3/selection_ms"] >= 0 for entry in logs)
    assert logs[-1]["id3/updates_total"] == 60 * 7 // 2


def test_summary_printed_at_train_begin(tmp_path, capsys):
    train(MLP(), mlp_data(), tmp_path, ID3Config(budget=30))
    out = capsys.readouterr().out
    assert "budget 30 of 195 selectable entries" in out and "uniform over 6 steps (5 per step)" in out


def test_total_steps_from_epochs_and_accumulation(tmp_path):
    # 64 rows / batch 8 = 8 micro-batches per epoch, accumulation 2 -> 4 optimizer steps, 3 epochs -> 12
    trainer = train(
        MLP(),
        mlp_data(),
        tmp_path,
        ID3Config(budget=24),
        max_steps=-1,
        num_train_epochs=3,
        gradient_accumulation_steps=2,
    )
    assert trainer.engine.schedule.total_steps == 12 and trainer.engine.steps_done == 12
    assert len(trainer.engine.unmasked) == 24


def test_accumulation_selects_like_one_big_batch(tmp_path):
    """4 micro-batches of 4 == one batch of 16: same gradients (up to float order), same entries."""
    runs = []
    for batch, accumulation in ((16, 1), (4, 4)):
        model = MLP()
        trainer = train(
            model,
            mlp_data(n=64),
            tmp_path / f"b{batch}",
            ID3Config(budget=60),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=4,
        )
        runs.append((trainer.engine.unmasked.fingerprint(), snapshot(model)))
    assert runs[0][0] == runs[1][0]
    for name in runs[0][1]:
        assert torch.allclose(runs[0][1][name], runs[1][1][name], atol=1e-6)


def test_bf16_autocast_on_cpu(tmp_path):
    model = tiny_bert()
    before = snapshot(model)
    trainer = train(model, token_data(), tmp_path, ID3Config(budget=100), bf16=True, weight_decay=0.1)
    assert_only_unmasked_changed(trainer, before)


def test_fp16_scaler_through_the_trainer(tmp_path, monkeypatch):
    """accelerate builds no GradScaler on CPU; give it one to run the Trainer's fp16 code path for real."""
    model = MLP()
    before = snapshot(model)
    callback = ID3Callback(ID3Config(budget=30))
    trainer = ID3Trainer(
        model=model, args=training_args(tmp_path), train_dataset=mlp_data(), callbacks=[callback]
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scales = []
    step = trainer.engine.step
    monkeypatch.setattr(trainer.engine, "step", lambda **kw: scales.append(kw) or step(**kw))
    trainer.train()
    assert scales and all(kw["check_overflow"] and kw["grad_scale"] >= 1.0 for kw in scales)
    assert_only_unmasked_changed(trainer, before)


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    config = dict(budget=300)
    args = dict(max_steps=6, save_strategy="steps", save_steps=3, weight_decay=0.1)
    full_model = tiny_bert()
    full = train(full_model, token_data(), tmp_path / "full", ID3Config(**config), **args)

    first = tiny_bert()
    train(first, token_data(), tmp_path / "half", ID3Config(**config), **args | {"max_steps": 6})
    resumed_model = tiny_bert()
    callback = ID3Callback(ID3Config(**config))
    resumed = ID3Trainer(
        model=resumed_model,
        args=training_args(tmp_path / "half", **args),
        train_dataset=token_data(),
        callbacks=[callback],
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "half" / "out" / "checkpoint-3"))
    assert resumed.engine.unmasked.fingerprint() == full.engine.unmasked.fingerprint()
    assert resumed.engine.steps_done == 6 and resumed.engine.updates_total == full.engine.updates_total
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name


def test_resume_with_another_budget_is_refused(tmp_path):
    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    train(MLP(), mlp_data(), tmp_path, ID3Config(budget=20), **args)
    trainer = ID3Trainer(
        model=MLP(),
        args=training_args(tmp_path, **args),
        train_dataset=mlp_data(),
        callbacks=[ID3Callback(budget=30)],
    )
    with pytest.raises(ValueError, match="Resume with the same ID3Config"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_plain_trainer_with_the_callback_explains_itself(tmp_path):
    from transformers import Trainer

    trainer = Trainer(
        model=MLP(), args=training_args(tmp_path), train_dataset=mlp_data(), callbacks=[ID3Callback()]
    )
    with pytest.raises(RuntimeError, match="Replace Trainer with ID3Trainer"):
        trainer.train()


def test_id3_trainer_without_callback(tmp_path):
    with pytest.raises(ValueError, match="exactly one ID3Callback"):
        ID3Trainer(model=MLP(), args=training_args(tmp_path), train_dataset=mlp_data())


def test_deepspeed_is_refused(tmp_path, monkeypatch):
    from transformers import Trainer

    real_init = Trainer.__init__

    def init_with_deepspeed(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.is_deepspeed_enabled = True

    monkeypatch.setattr(Trainer, "__init__", init_with_deepspeed)
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        ID3Trainer(
            model=MLP(), args=training_args(tmp_path), train_dataset=mlp_data(), callbacks=[ID3Callback()]
        )


def test_budget_larger_than_model_unmasks_everything(tmp_path):
    with pytest.warns(UserWarning, match="all of them will be unmasked"):
        trainer = train(MLP(), mlp_data(), tmp_path, ID3Config(budget=10_000))
    assert len(trainer.engine.unmasked) == 195
