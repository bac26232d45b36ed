"""ID3 on TRL's trainers (SFT with and without peft_config, DPO, GRPO), on a tiny random Llama."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import changed_entries, snapshot, tiny_llama

pytest.importorskip("trl")
pytest.importorskip("datasets")

import id3_callback  # noqa: E402
from id3_callback import ID3Callback, ID3Config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, 100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>", pad_token="<pad>"
    )


def sentences(n: int, words: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(3, 100, (words,), generator=g)) for _ in range(n)]


def build(kind: str, model, tmp_path, callback):
    from datasets import Dataset

    common = dict(
        output_dir=str(tmp_path / kind),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    kwargs = dict(processing_class=tokenizer(), callbacks=[callback])
    if kind.startswith("sft"):
        from trl import SFTConfig

        peft = None
        if kind == "sft_peft":
            from peft import LoraConfig

            peft = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        data = Dataset.from_dict({"text": sentences(16, 10, 0)})
        args = SFTConfig(max_length=16, **common)
        return id3_callback.ID3SFTTrainer(
            model=model, args=args, train_dataset=data, peft_config=peft, **kwargs
        )
    if kind == "dpo":
        from trl import DPOConfig

        data = Dataset.from_dict(
            {"prompt": sentences(16, 4, 0), "chosen": sentences(16, 4, 1), "rejected": sentences(16, 4, 2)}
        )
        args = DPOConfig(max_length=16, **common)
        return id3_callback.ID3DPOTrainer(
            model=model, ref_model=tiny_llama(), args=args, train_dataset=data, **kwargs
        )
    from trl import GRPOConfig

    data = Dataset.from_dict({"prompt": sentences(16, 4, 0)})
    args = GRPOConfig(max_completion_length=4, num_generations=2, generation_batch_size=4, **common)

    def reward(completions, **_):  # longer completions score higher
        return [float(len(c)) for c in completions]

    return id3_callback.ID3GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, **kwargs
    )


@pytest.mark.parametrize("kind", ["sft", "sft_peft", "dpo", "grpo"])
def test_only_budget_entries_change(tmp_path, kind):
    model = tiny_llama()
    before = snapshot(model)
    trainer = build(kind, model, tmp_path, ID3Callback(ID3Config(budget=200)))
    trained = trainer.model  # the peft model under peft_config
    after_init = snapshot(trained)
    trainer.train()
    engine = trainer.engine
    assert len(engine.unmasked) == engine.budget == 200 and engine.steps_done == 3
    changed = changed_entries(after_init, trained)
    for name, idx in changed.items():
        allowed = set(engine.unmasked.indices[name].tolist()) if name in engine.unmasked.params else set()
        assert set(idx.tolist()) <= allowed, f"{name}: masked entries moved"
    assert 0 < sum(v.numel() for v in changed.values()) <= 200
    if kind == "sft_peft":  # selection inside the adapters; the base weights stay bit-identical
        assert all("lora_" in name for name in engine.unmasked.params)
        for name, p in trained.get_base_model().named_parameters():
            if "lora_" not in name:
                assert torch.equal(p, before[name.replace(".base_layer", "")]), name
    assert any("id3/unmasked" in h for h in trainer.state.log_history)


def test_without_trl_the_import_error_names_the_install():
    code = "import sys; sys.modules['trl'] = None\nfrom id3_callback import ID3SFTTrainer"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert (
        proc.returncode == 1
        and "ImportError: ID3SFTTrainer" in proc.stderr
        and "pip install trl" in proc.stderr
    )
