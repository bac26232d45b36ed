"""Bounded weight gradients for an output layer tied to the input embedding (id3_callback/bounded_tied.py).

The reference is the dense path: autograd's gradient of the tied table (output layer + embedding) on a copy of
the model, scored whole and concatenated with every other tensor's scores (`brute_force_topk`). The bounded
path must choose the same entries (up to fp32 rounding ties at the cut, see test_bounded.py), hand the
optimizer the same gradients at the unmasked entries (both contributions), never build the table's gradient,
and train the same weights.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import brute_force_topk, dense_reference, same_up_to_rounding, tiny_llama, token_batches
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from id3_callback import ID3Config, ID3Engine, SparseAdamW, bounded_costs, selection
from id3_callback import bounded as bounded_mod

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, WIDTH = 97, 32  # a table size no other tensor of these models has


@pytest.fixture(autouse=True)
def small_layers(monkeypatch):
    """Every selectable Linear takes the bounded path; blocks far smaller than the table, so a tensor of the
    table's size can only be its gradient."""
    monkeypatch.setattr(selection, "BOUNDED_MIN_ENTRIES", 0)
    monkeypatch.setattr(selection, "SCORE_CHUNK", 256)
    monkeypatch.setattr(bounded_mod, "BLOCK_ENTRIES", 256)


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def tied_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=WIDTH, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


# name -> (model, the tied table's parameter name, its output layer)
MODELS = {
    "llama": (tied_llama, "model.embed_tokens.weight", lambda m: m.lm_head),
    "gpt2": (tied_gpt2, "transformer.wte.weight", lambda m: m.lm_head),
}


def _batches(steps, vocab=VOCAB):
    for batch in token_batches("lm", steps=steps):
        batch = {k: v % vocab for k, v in batch.items() if k != "attention_mask"}
        yield batch


def _engine(model, budget=300, steps=4, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ID3Engine(model, ID3Config(budget=budget, weight_grads="bounded", **kw))
    engine.start(steps)
    return engine


class TableSizedTensors(TorchDispatchMode):
    """Records every op output with the table's number of entries that is not a view of the table itself."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table, self.found = table, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor)
                and t.layout == torch.strided  # a sparse pattern of the table's shape holds only its entries
                and t.numel() == self.table.numel()
                and t.untyped_storage().data_ptr() != self.table.untyped_storage().data_ptr()
            ):
                self.found.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("dense_tokens", [0, 10**6])  # the bound / the cost model's GEMM rows
@pytest.mark.parametrize("model_key", list(MODELS))
def test_tied_table_selects_the_dense_top_k_with_both_gradients_and_never_builds_its_gradient(
    model_key, dense_tokens, monkeypatch
):
    monkeypatch.setattr(bounded_costs, "FIXED_TOKENS", dense_tokens)
    make, table_name, head_of = MODELS[model_key]
    model = make().eval()
    engine = _engine(model, budget=2000, steps=4)  # k = 500: rows outside the batch's tokens get chosen too
    table = engine.unmasked.params[table_name]
    assert engine.bounded.layers[table_name][0] is head_of(model)
    assert table_name in engine.plan.bounded_tied
    assert "bounded tied output layer " + table_name in engine.summary()
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    token_rows_selected = other_rows_selected = 0
    for batch in _batches(steps=6):  # steps 5-6 select nothing (k = 0): only the stash
        scores, dense_grads = dense_reference(model, engine, batch)
        k = engine.schedule.target(engine.steps_done + 1) - len(engine.unmasked)
        before = {n: i.numel() for n, i in engine.unmasked.indices.items()}
        with TableSizedTensors(table) as watch:
            model(**batch).loss.backward()
            assert table.grad is None
            engine.step()
        assert not watch.found, watch.found  # no tensor of the table's size but the table itself
        new = {
            int(i) + engine.plan.offsets[n]
            for n, idx in engine.unmasked.indices.items()
            for i in idx[before[n] :]
        }
        assert len(new) == max(k, 0)
        if k > 0:
            expected = brute_force_topk([scores], k)
            assert same_up_to_rounding(new, set(expected.tolist()), scores, scores[expected[-1]].item())
        rows = set(batch["input_ids"].reshape(-1).tolist())
        for i in engine.unmasked.indices[table_name][before[table_name] :].tolist():
            if i // WIDTH in rows:
                token_rows_selected += 1
            else:
                other_rows_selected += 1
        for name in engine.bounded.layers:  # the optimizer's gradients, both contributions for the table
            want = dense_grads[name][engine.unmasked.indices[name]]
            torch.testing.assert_close(engine.unmasked.grad_stash[name], want, rtol=1e-5, atol=1e-7)
        opt.step()
        opt.zero_grad()
    assert token_rows_selected and other_rows_selected  # both kinds of rows were chosen
    assert engine.bounded.uncertified_steps == 0 or dense_tokens == 0


@pytest.mark.parametrize("model_key", list(MODELS))
def test_forced_uncertified_steps_rescore_the_tied_output_layer_without_its_token_rows(
    model_key, monkeypatch
):
    monkeypatch.setattr(bounded_costs, "FIXED_TOKENS", 0)
    monkeypatch.setattr(bounded_mod, "MARGIN", 1e6)  # every threshold guess far above the cut
    make, table_name, _ = MODELS[model_key]
    model = make().eval()
    engine = _engine(model, steps=4)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    for batch in _batches(steps=4):
        scores, dense_grads = dense_reference(model, engine, batch)
        k = engine.schedule.target(engine.steps_done + 1) - len(engine.unmasked)
        before = len(engine.unmasked)
        model(**batch).loss.backward()
        engine.step()
        chosen = {
            int(i) + engine.plan.offsets[n]
            for n, idx in engine.unmasked.indices.items()
            for i in idx.tolist()
        }
        assert len(engine.unmasked) - before == k
        expected = brute_force_topk([scores], k)
        previous = {i for i in chosen if scores[i] == float("-inf")}
        got = chosen - previous
        assert same_up_to_rounding(got, set(expected.tolist()), scores, scores[expected[-1]].item())
        want = dense_grads[table_name][engine.unmasked.indices[table_name]]
        torch.testing.assert_close(engine.unmasked.grad_stash[table_name], want, rtol=1e-5, atol=1e-7)
        opt.step()
        opt.zero_grad()
    assert engine.bounded.uncertified_steps == 3  # every step after the first (which verifies everything)


def _train(model_key, mode, steps=7, snapshot_at=None, resume=None):
    """A plain loop of `steps` optimizer steps. With `snapshot_at`, also returns copies of the model, engine
    and optimizer states taken before that step; with `resume` (such a snapshot), training starts from it in
    fresh objects, at its step. A resumed run continues the run the snapshot came from: the branch costs
    measured in that run's first steps are part of its engine state."""
    make = MODELS[model_key][0]
    model = make().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ID3Engine(model, ID3Config(budget=300, weight_grads=mode))
    first = 0
    if resume is not None:
        first, (model_state, engine_state, opt_state) = resume
        model.load_state_dict(model_state)
        engine.load_state_dict(engine_state)
    engine.start(steps)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    if resume is not None:
        opt.load_state_dict(opt_state)
    snapshot = None
    for step, batch in enumerate(_batches(steps=steps)):
        if step < first:
            continue
        if step == snapshot_at:
            snapshot = (step, copy.deepcopy((model.state_dict(), engine.state_dict(), opt.state_dict())))
        model(**batch).loss.backward()
        engine.step()
        opt.step()
        opt.zero_grad()
    return (model, engine) if snapshot_at is None else (model, engine, snapshot)


@pytest.mark.parametrize("model_key", list(MODELS))
def test_tied_training_matches_the_dense_path_and_resumes_bitwise(model_key):
    dense_model, dense = _train(model_key, "dense")
    model, engine, snapshot = _train(model_key, "bounded", snapshot_at=5)
    assert MODELS[model_key][1] in engine.bounded.layers and dense.bounded is None
    for name in dense.unmasked.params:
        assert torch.equal(dense.unmasked.sorted_indices(name)[0], engine.unmasked.sorted_indices(name)[0])
    for a, b in zip(dense_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # from after the branch costs' probe steps (1-4): the state carries the choices measured in them
    resumed_model, resumed = _train(model_key, "bounded", resume=snapshot)
    assert resumed.branch_costs.rows_below == engine.branch_costs.rows_below
    assert resumed.unmasked.fingerprint() == engine.unmasked.fingerprint()
    for (n, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), n


def test_untied_output_layer_is_a_plain_bounded_linear():
    model = tiny_llama()
    engine = _engine(model)
    module, kind = engine.bounded.layers["lm_head.weight"]
    assert module is model.lm_head and kind == "linear" and not engine.plan.bounded_tied


class BiasedHead(nn.Module):
    """A table tied to an output layer with a bias: not completed by bounded_tied (the plan says why)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mid = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.head.weight = self.embed.weight

    def forward(self, input_ids):
        return self.head(torch.tanh(self.mid(self.embed(input_ids))))


def test_a_tied_table_the_path_cannot_complete_stays_dense_and_the_plan_says_why():
    torch.manual_seed(0)
    model = BiasedHead()
    engine = _engine(model, budget=50)
    assert "embed.weight" not in engine.bounded.layers and "mid.weight" in engine.bounded.layers
    assert "embed.weight is shared with another module" in " ".join(engine.plan.bounded_skipped)
    assert "bounded weight gradients off for: embed.weight" in engine.summary()
    ids = torch.randint(0, VOCAB, (4, 6))
    model(ids).logsumexp(-1).sum().backward()
    assert model.embed.weight.grad is not None  # autograd's dense gradient, scored by the scan
    engine.step()
    assert len(engine.unmasked) == engine.schedule.target(1)


def test_an_output_layer_on_its_own_forward_leaves_the_whole_table_to_autograd():
    """An output layer that runs its own forward (as under autocast): the embedding's rows then go to autograd too, so
    `p.grad` is the whole dense gradient and the scan scores it like any other tensor."""
    model = tied_llama().eval()
    engine = _engine(model)
    batch = next(_batches(steps=1))
    _, dense_grads = dense_reference(model, engine, batch)
    head = model.lm_head
    forward = head.forward
    head.forward = lambda x: forward(x) if not torch.is_grad_enabled() else nn.Linear.forward(head, x)
    model(**batch).loss.backward()
    table = engine.unmasked.params["model.embed_tokens.weight"]
    torch.testing.assert_close(table.grad.to_dense().reshape(-1), dense_grads["model.embed_tokens.weight"])
    engine.step()
    assert len(engine.unmasked) == engine.schedule.target(1)
