"""Tiny models built from configs and tiny datasets: no downloads, seconds per test."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _restore_accelerate_env():
    # transformers 4.x's TrainingArguments writes ACCELERATE_MIXED_PRECISION into os.environ and reads it
    # back as its default: after one bf16 test, every later Trainer (and each DDP worker) would run in bf16.
    saved = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    yield
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        del os.environ[key]
    os.environ.update(saved)


class MLP(nn.Module):
    """A small classifier that speaks the Trainer's dict-in, loss-out protocol."""

    def __init__(self, d_in: int = 8, hidden: int = 16, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, **columns):
        self.columns = columns
        self.n = len(next(iter(columns.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def mlp_data(n: int = 64, d_in: int = 8, classes: int = 3, seed: int = 0) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    return DictDataset(
        x=torch.randn(n, d_in, generator=g), labels=torch.randint(0, classes, (n,), generator=g)
    )


def tiny_bert(num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def token_data(n: int = 32, seq: int = 12, vocab: int = 100, kind: str = "cls", seed: int = 0) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    if kind == "cls":
        return DictDataset(
            input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.randint(0, 2, (n,), generator=g)
        )
    if kind == "lm":
        return DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
    if kind == "s2s":
        return DictDataset(
            input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids[:, : seq // 2].clone()
        )
    raise ValueError(kind)


def token_batches(kind: str, steps: int, size: int = 4, seed: int = 0):
    """`steps` stacked batches of `size` rows of `token_data` (seq 12), for plain training loops."""
    data = token_data(n=steps * size, seq=12, kind=kind, seed=seed)
    for s in range(steps):
        rows = range(s * size, (s + 1) * size)
        yield {key: torch.stack([data[i][key] for i in rows]) for key in data.columns}


MODELS = {
    "mlp": (lambda: MLP(), lambda: mlp_data()),
    "bert": (lambda: tiny_bert(), lambda: token_data(kind="cls")),
    "llama": (lambda: tiny_llama(), lambda: token_data(kind="lm")),
    "t5": (lambda: tiny_t5(), lambda: token_data(kind="s2s")),
}


def training_args(tmp_path, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        max_steps=6,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_entries(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Per tensor, the flat indices whose bits differ from `before`."""
    out = {}
    for n, p in model.named_parameters():
        a, b = before[n].reshape(-1), p.detach().reshape(-1)
        diff = (a.view(torch.int32) != b.view(torch.int32)) if a.dtype == torch.float32 else (a != b)
        out[n] = diff.nonzero().view(-1)
    return out


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path
