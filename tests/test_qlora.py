"""QLoRA: ID3 inside LoRA on a 4-bit (NF4, bitsandbytes) base, on the CPU.

bitsandbytes' CPU 4-bit path packs weights in blocks of 64 inputs, so the tiny Llama here is 128 wide.
"""

from __future__ import annotations

import pytest
import torch
from helpers import changed_entries, snapshot, token_batches

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from id3_callback import ID3Config, ID3Engine, SparseAdamW  # noqa: E402


def qlora_llama(tmp_path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def test_only_budget_entries_of_the_lora_weights_change_on_a_4bit_base(tmp_path):
    model = qlora_llama(tmp_path)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    # bitsandbytes repacks 4-bit weights for its CPU kernels on the first forward, so the snapshot comes after
    # one. With bitsandbytes 0.50.2 a first forward under no_grad left the LoRA weights without gradients in
    # later backwards: the warm-up runs with a backward.
    model(**next(token_batches("lm", 1, seed=1))).loss.backward()
    model.zero_grad(set_to_none=True)
    before = snapshot(model)  # the packed 4-bit bytes included
    engine = ID3Engine(model, ID3Config(budget=300))
    engine.start(total_steps=4)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2, weight_decay=0.01)
    for batch in token_batches("lm", 4):
        model(**batch).loss.backward()
        engine.step()
        opt.step()
        opt.zero_grad()
    assert len(engine.unmasked) == engine.budget == 300
    assert all("lora_" in name for name in engine.unmasked.params)
    changed = changed_entries(before, model)
    for name, idx in changed.items():
        allowed = set(engine.unmasked.indices[name].tolist()) if name in engine.unmasked.params else set()
        assert set(idx.tolist()) <= allowed, f"{name}: masked entries moved"
    assert 0 < sum(v.numel() for v in changed.values()) <= 300
