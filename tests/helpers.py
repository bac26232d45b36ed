"""Shared test helpers: tiny models built from configs, tiny datasets, the brute-force top-k reference.

Imported as `from helpers import ...` (pytest puts this folder on sys.path through conftest.py).
"""

from __future__ import annotations

import torch
from torch import nn

from id3_callback.selection import INELIGIBLE, StreamingTopK


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


def tiny_llama(seed: int = 0, attention_bias: bool = False):
    """A 2-layer Llama with untied embeddings; `attention_bias=True` gives BitFit biases to select."""
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
        attention_bias=attention_bias,
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


# ------------------------------------------------------------------------------------------- top-k reference
def brute_force_topk(scores: list[torch.Tensor], k: int) -> torch.Tensor:
    """The reference for every exact top-k: global indices of the k best entries of the concatenation, higher
    score first, ties to the lower index; -inf, NaN and Inf are never chosen."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    flat = torch.nan_to_num(flat, nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))
    eligible = (flat > float("-inf")).nonzero().view(-1)
    # eligible is ascending, and a stable sort by value descending keeps the lower index first among ties
    order = torch.argsort(flat[eligible], descending=True, stable=True)
    return eligible[order][:k]


def split_by_tensor(global_index: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Split global indices (any order) into per-tensor sorted local indices."""
    global_index = torch.sort(global_index).values
    bounds = torch.tensor([0, *sizes], dtype=torch.long).cumsum(0)
    cuts = torch.searchsorted(global_index, bounds).tolist()
    empty = global_index[:0]
    starts = bounds.tolist()
    return [global_index[a:b] - o if b > a else empty for a, b, o in zip(cuts, cuts[1:], starts)]


def global_topk(score_chunks: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Top-k across tensors through `StreamingTopK`; returns, per input tensor, the sorted flat indices chosen.

    Example:
        >>> global_topk([torch.tensor([3.0, 1.0]), torch.tensor([2.0, float("nan")])], 2)
        [tensor([0]), tensor([0])]
    """
    top = StreamingTopK(k)
    sizes = []
    for scores in score_chunks:
        clean = torch.nan_to_num(
            scores.reshape(-1).float(), nan=INELIGIBLE, posinf=INELIGIBLE, neginf=INELIGIBLE
        )
        top.push(clean)
        sizes.append(clean.numel())
    return split_by_tensor(top.result()[1], sizes)


def same_up_to_rounding(a: set, b: set, scores: torch.Tensor, cut: float) -> bool:
    """Two selections of the same k agree, or differ only in entries whose score is within fp32 rounding
    of the cut (a gathered dot product and a GEMM sum the T products in different orders)."""
    return all(abs(scores[i].item() - cut) <= 1e-4 * abs(cut) for i in a ^ b)


def dense_reference(model: nn.Module, engine, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every selectable entry's D3 score (already unmasked: -inf) from autograd's dense gradients on a copy
    of the model without the bounded path's replaced forwards and hooks, and those gradients (flat)."""
    import copy

    from id3_callback import d3_scores

    ref = copy.deepcopy(model)
    for module in ref.modules():
        module.__dict__.pop("forward", None)
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    ref(**batch).loss.backward()
    params = dict(ref.named_parameters())
    scores, grads = [], {}
    for name in engine.unmasked.params:
        p = params[name]
        s = d3_scores(p.grad.reshape(-1), p.detach().reshape(-1), engine.config.eps, engine.config.exp)
        s[engine.unmasked.indices[name]] = float("-inf")
        scores.append(s)
        grads[name] = p.grad.reshape(-1)
    return torch.cat(scores), grads


def assert_added_top_k(engine, before: dict[str, int], k: int, scores: torch.Tensor) -> set[int]:
    """The k entries the last `engine.step()` added (global indices; `before`: each tensor's unmasked count
    before it) are the top-k of `scores`, up to fp32 rounding ties at the cut. Returns them."""
    new = {
        int(i) + engine.plan.offsets[n]
        for n, idx in engine.unmasked.indices.items()
        for i in idx[before[n] :]
    }
    expected = brute_force_topk([scores], k)
    assert len(new) == k
    assert same_up_to_rounding(new, set(expected.tolist()), scores, scores[expected[-1]].item())
    return new
