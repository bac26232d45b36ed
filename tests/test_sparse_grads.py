"""Row-sparse embedding gradients: bitwise the dense ones, and every reader of gradients accepts them."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_bert, tiny_llama, tiny_t5, token_data, training_args
from helpers import token_batches as batches
from torch import nn
from transformers import TrainerCallback

import id3_callback.engine as engine_mod
import id3_callback.selection as sel
from id3_callback import ID3Callback, ID3Config, ID3Engine, ID3Trainer, SparseAdamW, TrainingSettings
from id3_callback.sparse_grads import (
    RowSparseEmbeddings,
    TiedOutputStreams,
    coalesced_rows,
    gather_entries,
    mask_rows_,
    row_sparse_candidates,
    tied_output_candidates,
)


@pytest.fixture
def tiny_tables(monkeypatch):
    """Let the tiny models' embeddings (3,200 entries) take the row-sparse path (the default needs 65,536)."""
    monkeypatch.setattr(sel, "ROW_SPARSE_MIN_ENTRIES", 1)


# ------------------------------------------------------------------------------------------------ the backward
@pytest.mark.parametrize("padding_idx", [None, 0, -1])
def test_backward_is_bitwise_the_dense_one_with_accumulation(padding_idx):
    torch.manual_seed(0)
    dense, sparse = (
        nn.Embedding(300, 16, padding_idx=padding_idx),
        nn.Embedding(300, 16, padding_idx=padding_idx),
    )
    sparse.load_state_dict(dense.state_dict())
    hooks = RowSparseEmbeddings({"w": sparse})
    for _ in range(3):  # three backwards accumulate, with repeated tokens and the padding row
        ids = torch.randint(0, 40, (6, 20))
        ids[:, -5:] = 0 if padding_idx is None or padding_idx == 0 else 299
        upstream = torch.randn(6, 20, 16)
        out_d, out_s = dense(ids), sparse(input=ids)  # keyword call too
        assert torch.equal(out_d, out_s)
        (out_d * upstream).sum().backward()
        (out_s * upstream).sum().backward()
    assert sparse.weight.grad.is_sparse and not sparse.weight.grad.is_coalesced()
    rows, block = coalesced_rows(sparse.weight.grad)
    rebuilt = torch.zeros_like(dense.weight.grad)
    rebuilt[rows] = block
    assert torch.equal(rebuilt, dense.weight.grad)
    assert rows.numel() < 300 // 2
    hooks.remove()
    sparse.weight.grad = None
    sparse(ids).sum().backward()
    assert not sparse.weight.grad.is_sparse  # removed: dense again


def test_no_grad_forward_is_left_alone():
    emb = nn.Embedding(50, 4)
    RowSparseEmbeddings({"w": emb})
    with torch.no_grad():
        out = emb(torch.tensor([1, 2]))
    assert out.grad_fn is None and torch.equal(out, emb.weight[[1, 2]])


def test_gather_and_mask_match_dense_indexing():
    g = torch.zeros(10, 3)
    g[[2, 7]] = torch.randn(2, 3)
    sparse = g.to_sparse(sparse_dim=1)
    idx = torch.tensor([0, 6, 7, 8, 21, 22, 29])
    assert torch.equal(gather_entries(sparse, idx), g.view(-1)[idx])
    mask_rows_(sparse, idx)
    expected = torch.zeros(30)
    expected[idx] = g.view(-1)[idx]
    assert torch.equal(sparse.to_dense().view(-1), expected)


def test_which_tables_qualify():
    model = tiny_llama()  # untied: its input embedding qualifies, the output layer is a Linear
    params = dict(model.named_parameters())
    assert list(row_sparse_candidates(model, params, 1)) == ["model.embed_tokens.weight"]
    assert row_sparse_candidates(model, params, 10**9) == {}  # too small
    t5 = tiny_t5()  # the shared table is tied to the output layer: it gets a dense gradient there anyway
    assert "shared.weight" not in row_sparse_candidates(t5, dict(t5.named_parameters()), 1)
    bf16 = tiny_llama().to(torch.bfloat16)  # the dense kernel sums bf16 in another precision
    assert row_sparse_candidates(bf16, dict(bf16.named_parameters()), 1) == {}
    model.model.embed_tokens.scale_grad_by_freq = True
    assert row_sparse_candidates(model, params, 1) == {}


# ------------------------------------------------------------------------------------- tied output layers
class TiedLM(nn.Module):
    """Embedding -> one layer -> output layer sharing the embedding's table, the shape of a tied causal LM."""

    def __init__(self, vocab: int = 210, width: int = 8, padding_idx: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width, padding_idx=padding_idx)
        self.mid = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, extra_head_call: bool = False) -> torch.Tensor:
        logits = self.head(torch.tanh(self.mid(self.embed(ids))))
        if extra_head_call:
            logits = logits + self.head(torch.ones(1, self.mid.out_features))
        return logits


def tied_pair(padding_idx=None):
    dense, streamed = TiedLM(padding_idx=padding_idx), TiedLM(padding_idx=padding_idx)
    blocks = []
    sink = lambda name, first, block, rows: blocks.append((first, block.clone(), rows.clone()))  # noqa: E731
    tables = tied_output_candidates(streamed, dict(streamed.named_parameters()), 1)
    return dense, streamed, TiedOutputStreams(tables, sink, block_entries=40 * 8), blocks


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_tied_output_gradient_arrives_in_two_parts_that_are_bitwise_the_dense_one(padding_idx):
    dense, streamed, streams, blocks = tied_pair(padding_idx)
    ids = torch.tensor([[3, 9, 9, 41, 3], [0, 9, 207, 3, 3]])
    upstream = torch.randn(2, 5, 210)
    (dense(ids) * upstream).sum().backward()
    (streamed(ids) * upstream).sum().backward()
    ref = dense.embed.weight.grad
    # 210 rows in blocks of 40 (320 entries): every row arrives once, in order; the 10-row tail joins the
    # block before it (products of a few rows would round differently)
    assert [(first, len(block)) for first, block, _ in blocks] == [
        (0, 40),
        (40, 40),
        (80, 40),
        (120, 40),
        (160, 50),
    ]
    token_rows = torch.tensor([0, 3, 9, 41, 207])
    assert torch.equal(torch.cat([rows + first for first, _, rows in blocks]), token_rows)
    rebuilt = torch.cat([block for _, block, _ in blocks])  # the output layer's part, every row
    grad = streamed.embed.weight.grad
    assert grad.is_sparse  # no vocab-sized gradient reached autograd
    rows, values = coalesced_rows(grad)
    assert torch.equal(rows, token_rows)  # the token rows only, the padding row included
    rebuilt[rows] = values  # ... which the embedding completed
    assert torch.equal(rebuilt, ref)
    assert torch.equal(
        streamed.mid.weight.grad, dense.mid.weight.grad
    )  # the input gradient is autograd's too


def test_tied_output_called_twice_or_without_grad_falls_back_to_the_dense_gradient():
    dense, streamed, streams, blocks = tied_pair()
    ids = torch.tensor([[1, 2, 2]])
    with torch.no_grad():  # evaluation: left alone, and not counted as a call
        assert torch.equal(streamed(ids), dense(ids))
    dense(ids, extra_head_call=True).sum().backward()
    streamed(ids, extra_head_call=True).sum().backward()  # two output passes: no row is final alone
    assert blocks == [] and not streamed.embed.weight.grad.is_sparse
    assert torch.equal(streamed.embed.weight.grad, dense.embed.weight.grad)
    streamed.zero_grad(set_to_none=True)
    streamed(ids).sum().backward()  # the next forward streams again
    assert streamed.embed.weight.grad.is_sparse and len(blocks) == 5
    streams.remove()
    assert "forward" not in streamed.head.__dict__  # the class's forward again
    streamed.zero_grad(set_to_none=True)
    streamed(ids).sum().backward()
    assert not streamed.embed.weight.grad.is_sparse and len(blocks) == 5


def test_which_tied_tables_qualify():
    model = TiedLM()
    params = dict(model.named_parameters())
    assert list(tied_output_candidates(model, params, 1)) == ["embed.weight"]
    assert tied_output_candidates(model, params, 10**9) == {}  # too small
    t5 = tiny_t5()  # encoder, decoder (and the unused `shared`) embeddings, one output layer
    embeddings, head = tied_output_candidates(t5, dict(t5.named_parameters()), 1)["shared.weight"]
    # 5.x gives the encoder and decoder their own Embedding modules on the shared weight; 4.x reuses `shared`
    users = {id(m) for m in t5.modules() if isinstance(m, nn.Embedding) and m.weight is t5.shared.weight}
    assert {id(e) for e in embeddings} == users and head is t5.lm_head
    untied = tiny_llama()
    assert tied_output_candidates(untied, dict(untied.named_parameters()), 1) == {}
    model.head.bias = nn.Parameter(torch.zeros(210))  # one more sum to reproduce: not streamed
    assert tied_output_candidates(model, params, 1) == {}
    model = TiedLM()
    model.other = nn.Linear(8, 210, bias=False)
    model.other.weight = model.embed.weight  # a third user
    assert tied_output_candidates(model, dict(model.named_parameters()), 1) == {}


# ---------------------------------------------------------------------------------------- through the engine
def run_plain(
    sparse: bool, low_memory: bool = False, clip: float | None = None, method: str = "id3", steps=5
):
    model = tiny_bert()
    config = ID3Config(budget=150, sparse_embedding_grads=sparse, low_memory=low_memory, method=method)
    engine = ID3Engine(model, config)
    fisher = lambda: ((model(**b).loss, 4) for b in batches("cls", 2, seed=1))  # noqa: E731 (FISH's data)
    engine.start(steps, calibration_batches=fisher)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2, weight_decay=0.01)
    grads, norms = [], []
    for batch in batches("cls", steps):
        model(**batch).loss.backward()
        engine.step()
        if clip is not None:
            norms.append(float(engine.clip_grad_norm_(clip)))
        emb = model.bert.embeddings.word_embeddings.weight.grad
        grads.append(None if emb is None else emb.to_dense().clone())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, engine, grads, norms


@pytest.mark.filterwarnings("ignore:the Fisher estimate", "ignore:method 'bitfit'")
@pytest.mark.parametrize(
    "method", ["id3", "static", "pafi", "random", "increment-magnitude", "fish", "bitfit"]
)
def test_same_selection_gradients_and_weights_as_dense(tiny_tables, method):
    dense_model, dense_engine, dense_grads, _ = run_plain(False, method=method)
    model, engine, grads, _ = run_plain(True, method=method)
    assert engine.sparse_tables and not dense_engine.sparse_tables
    assert "bert.embeddings.word_embeddings.weight" in engine.sparse_tables
    assert "row-sparse embedding gradients: bert.embeddings.word_embeddings.weight" in engine.summary()
    assert "row-sparse" not in dense_engine.summary()
    assert engine.unmasked.fingerprint() == dense_engine.unmasked.fingerprint()
    for a, b in zip(grads, dense_grads):  # the masked embedding gradient, as the optimizer saw it
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(model.state_dict().values(), dense_model.state_dict().values()):
        assert torch.equal(a, b)
    if method == "id3":  # the embedding took part: some of its entries were chosen
        assert engine.unmasked.indices["bert.embeddings.word_embeddings.weight"].numel() > 0


def test_low_memory_and_clipping_with_sparse_gradients(tiny_tables):
    ref_model, ref_engine, _, ref_norms = run_plain(False, clip=0.05)
    for low_memory in (False, True):
        model, engine, _, norms = run_plain(True, low_memory=low_memory, clip=0.05)
        assert engine.low_memory == low_memory and engine.sparse_tables
        assert norms == ref_norms and min(norms) > 0.05  # the same norm, and the clip binds
        assert engine.unmasked.fingerprint() == ref_engine.unmasked.fingerprint()
        for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
            assert torch.equal(a, b)


def test_clip_matches_torch_on_dense_gradients():
    model = tiny_bert()
    engine = ID3Engine(model, ID3Config(budget=150, dense="classifier"))
    engine.start(3)
    model(**next(batches("cls", 1))).loss.backward()
    engine.step()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    params = dict(model.named_parameters())
    clones = [nn.Parameter(params[n].detach().clone()) for n in reference]
    for c, n in zip(clones, reference):
        c.grad = reference[n].clone()
    expected = torch.nn.utils.clip_grad_norm_(clones, 0.01)
    norm = engine.clip_grad_norm_(0.01)
    assert float(norm) == pytest.approx(float(expected), rel=1e-6) and float(norm) > 0.01
    for c, n in zip(clones, reference):
        assert torch.allclose(params[n].grad, c.grad, rtol=1e-6, atol=0)


def test_plain_loop_default_is_dense_and_explicit_true_that_cannot_apply_warns(tiny_tables):
    assert not ID3Engine(tiny_bert(), ID3Config(budget=100)).sparse_grads  # None: off outside the Trainer
    # ... except in low-memory mode, which frees p.grad in backward: the loop never sees the layout
    assert ID3Engine(tiny_bert(), ID3Config(budget=100, low_memory=True)).sparse_grads
    with pytest.warns(
        UserWarning, match="low_memory=True"
    ):  # a static method: that mode falls back at start,
        engine = ID3Engine(tiny_bert(), ID3Config(budget=100, low_memory=True, method="pafi"))
        engine.start(3)
    assert not engine.low_memory and not engine.sparse_grads  # and the sparse layout with it
    for config, needle in [
        ({"optimizer": "trainer"}, "optimizer='trainer'"),
        ({"method": "repeat"}, "'repeat'"),
    ]:
        with pytest.warns(UserWarning, match=needle):
            engine = ID3Engine(tiny_bert(), ID3Config(budget=100, sparse_embedding_grads=True, **config))
        engine.start(3)
        assert not engine.sparse_grads and not engine.sparse_tables
        assert any(
            needle in reason for reason in engine.plan.sparse_grad_blockers
        )  # and the summary says why
        assert "row-sparse embedding gradients off" in engine.summary()
    trainer_like = TrainingSettings(grads_through_engine=True)
    assert ID3Engine(tiny_bert(), ID3Config(budget=100), settings=trainer_like).sparse_grads
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto: off, silently
        fp16 = TrainingSettings(grads_through_engine=True, loss_scaling=True)
        assert not ID3Engine(tiny_bert(), ID3Config(budget=100), settings=fp16).sparse_grads


def test_ddp_found_at_start_turns_it_off(tiny_tables, monkeypatch):
    # as under ID3Trainer, built before the process group exists
    engine = ID3Engine(
        tiny_bert(), ID3Config(budget=100), settings=TrainingSettings(grads_through_engine=True)
    )
    assert engine.sparse_grads
    monkeypatch.setattr(engine_mod, "is_distributed", lambda: True)
    engine.start(3)
    assert not engine.sparse_grads and not engine.sparse_tables


# --------------------------------------------------------------------------------------------- the Trainer
class Layouts(TrainerCallback):
    """Records the word embedding's gradient layout just before each optimizer step."""

    def __init__(self, model) -> None:
        self.weight = model.bert.embeddings.word_embeddings.weight
        self.layouts = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.layouts.append(None if self.weight.grad is None else self.weight.grad.layout)


def train(tmp_path, sparse: bool | None, **args):
    model = tiny_bert()
    probe = Layouts(model)
    trainer = ID3Trainer(
        model=model,
        args=training_args(tmp_path / str(sparse), weight_decay=0.01, **args),
        train_dataset=token_data(n=48),
        callbacks=[ID3Callback(ID3Config(budget=150, sparse_embedding_grads=sparse)), probe],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on the default path
        trainer.train()
    return trainer, probe.layouts


def test_trainer_turns_it_on_and_matches_dense_training(tiny_tables, tmp_path):
    # default max_grad_norm=1.0 and a tight one: clipping goes through the engine, which reads sparse gradients
    for max_grad_norm in (1.0, 0.05):
        auto, layouts = train(tmp_path / str(max_grad_norm), None, max_grad_norm=max_grad_norm)
        dense, dense_layouts = train(tmp_path / str(max_grad_norm), False, max_grad_norm=max_grad_norm)
        assert torch.sparse_coo in layouts and torch.sparse_coo not in dense_layouts
        assert auto.engine.unmasked.fingerprint() == dense.engine.unmasked.fingerprint()
        for a, b in zip(auto.model.state_dict().values(), dense.model.state_dict().values()):
            assert torch.equal(a, b)
        norms = [[h["grad_norm"] for h in t.state.log_history if "grad_norm" in h] for t in (auto, dense)]
        assert norms[0] == norms[1]
        assert not auto.engine.sparse_tables  # hooks removed at train end: evaluation and analysis see dense
        auto.model(**next(batches("cls", 1))).loss.backward()
        assert not auto.model.bert.embeddings.word_embeddings.weight.grad.is_sparse


def test_trainer_with_accumulation(tiny_tables, tmp_path):
    auto, layouts = train(tmp_path, None, gradient_accumulation_steps=3)
    dense, _ = train(tmp_path, False, gradient_accumulation_steps=3)
    assert torch.sparse_coo in layouts
    for a, b in zip(auto.model.state_dict().values(), dense.model.state_dict().values()):
        assert torch.equal(a, b)
