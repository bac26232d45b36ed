"""ID3 inside peft adapters: LoRA (entries of lora_A / lora_B), IA3, and modules_to_save heads."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from helpers import changed_entries, snapshot, tiny_bert, token_data, training_args

from id3_callback import ID3Config, ID3Engine, apply_delta, save_delta
from id3_callback.peft_utils import MODULES_TO_SAVE, ia3_include, lora_include

peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")


def lora_model(bias: str = "none", seed: int = 0):
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], bias=bias)
    return peft.get_peft_model(tiny_bert(seed=seed), config)


def ia3_model(seed: int = 0):
    config = peft.IA3Config(
        task_type="SEQ_CLS",
        target_modules=["key", "value", "output.dense"],
        feedforward_modules=["output.dense"],
    )
    return peft.get_peft_model(tiny_bert(seed=seed), config)


def _lora_entries(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if re.search(r"\.lora_[AB]\.", n))


def test_default_selection_is_the_adapters_and_lora_include_narrows_it():
    model = lora_model()
    engine = ID3Engine(model, ID3Config(budget=100, dense=MODULES_TO_SAVE))
    assert all(re.search(lora_include(), n) for n in engine.unmasked.params)
    assert engine.selectable == _lora_entries(model)
    assert set(engine.unmasked.dense) == {n for n in dict(model.named_parameters()) if "modules_to_save" in n}

    # With trainable base biases too (bias="lora_only"), include=lora_include() keeps the budget on A/B.
    model = lora_model(bias="lora_only")
    engine = ID3Engine(model, ID3Config(budget=100, dense=MODULES_TO_SAVE))
    assert engine.selectable > _lora_entries(model)
    engine = ID3Engine(model, ID3Config(budget=100, include=lora_include(), dense=MODULES_TO_SAVE))
    assert engine.selectable == _lora_entries(model)
    assert not any("base_layer" in n for n in engine.unmasked.params)


def test_lora_b_zero_init_puts_the_first_steps_on_lora_b():
    model = lora_model()
    engine = ID3Engine(model, ID3Config(budget=200, dense=MODULES_TO_SAVE))
    engine.start(4)
    batch = token_data(n=8, seq=8, kind="cls").columns
    model(**batch).loss.backward()
    lora_a = [p for n, p in engine.unmasked.params.items() if ".lora_A." in n]
    assert all(p.grad is not None and not p.grad.any() for p in lora_a)  # B = 0 blocks A's gradient
    engine.step()
    chosen = {n for n, idx in engine.unmasked.indices.items() if idx.numel()}
    assert chosen and all(".lora_B." in n for n in chosen)


def _train(model, tmp_path, config, steps=6):
    from id3_callback import ID3Callback, ID3Trainer
    from id3_callback.logging import MaskHeatmapCallback

    args = training_args(
        tmp_path, per_device_train_batch_size=4, max_steps=steps, weight_decay=0.1, logging_steps=6
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ID3Trainer(
            model=model, args=args, train_dataset=token_data(n=24, seq=8), callbacks=[ID3Callback(config)]
        )
    trainer.remove_callback(MaskHeatmapCallback)
    trainer.train()
    return trainer


def _check_masked_and_delta(trainer, model, before, make_model, tmp_path):
    engine = trainer.engine
    assert len(engine.unmasked) == engine.budget
    changed = changed_entries(before, model)
    for name, idx in changed.items():
        if name in engine.unmasked.dense:
            continue
        allowed = engine.unmasked.indices[name] if name in engine.unmasked.params else torch.empty(0)
        assert set(idx.tolist()) <= set(allowed.tolist()), name
    assert sum(i.numel() for n, i in changed.items() if n in engine.unmasked.params) > 0
    path = save_delta(trainer, tmp_path / "adapter.delta.safetensors")
    fresh = make_model()
    apply_delta(fresh, path)
    trained = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, trained[name]), name
    return changed


def test_lora_id3_delta_is_exact_and_merges(tmp_path):
    model = lora_model()
    before = snapshot(model)
    trainer = _train(model, tmp_path, ID3Config(budget=120, include=lora_include(), dense=MODULES_TO_SAVE))
    changed = _check_masked_and_delta(trainer, model, before, lora_model, tmp_path)

    # The classifier head: its modules_to_save copy trained whole, the original left alone.
    assert any(changed[n].numel() for n in changed if "modules_to_save" in n)
    assert all(changed[n].numel() == 0 for n in changed if "original_module" in n)

    batch = token_data(n=8, seq=8, seed=1).columns
    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(**batch).logits
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_ia3_with_static_method(tmp_path):
    model = ia3_model()
    before = snapshot(model)
    config = ID3Config(budget=40, method="static", include=ia3_include(), dense=MODULES_TO_SAVE)
    trainer = _train(model, tmp_path, config)
    assert all(".ia3_l." in n for n in trainer.engine.unmasked.params)
    _check_masked_and_delta(trainer, model, before, ia3_model, tmp_path)
