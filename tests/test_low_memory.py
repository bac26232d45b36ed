"""Low-memory mode: gradients scored and freed during backward, with exactly the standard mode's result.

The standard mode keeps every dense gradient until the optimizer step; `ID3Config(low_memory=True)`
scores each tensor in a post-accumulate-grad hook, keeps only the running top-k candidates and the
unmasked entries' gradient values, and frees the gradient at once. Selection is exact either way (the
global order, not the hook order, breaks ties), and SparseAdamW does the same arithmetic on the same
values in the same layout, so the weights come out bitwise identical.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_bert, tiny_llama, tiny_t5, token_data, training_args
from helpers import token_batches as batches
from transformers import TrainerCallback

import id3_callback.selection as sel
from id3_callback import ID3Callback, ID3Config, ID3Engine, ID3Trainer, SparseAdamW, TrainingSettings
from id3_callback.trainer import trainer_clips_inline

pytestmark = pytest.mark.usefixtures("one_thread")


def tied_llama():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight  # two contributions to one gradient
    return model


MODELS = {
    "bert": (tiny_bert, "cls"),
    "llama": (tiny_llama, "lm"),
    "tied_llama": (tied_llama, "lm"),
    "t5": (tiny_t5, "s2s"),  # one table: encoder and decoder embeddings, tied output layer
}
TIED = {"tied_llama": ["model.embed_tokens.weight"], "t5": ["shared.weight"]}


def run_plain(
    model_name: str,
    low_memory: bool,
    steps: int = 5,
    budget: int = 300,
    checkpointing: bool = False,
    **config,
):
    make, kind = MODELS[model_name]
    model = make()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = ID3Engine(model, ID3Config(budget=budget, low_memory=low_memory, **config))
    engine.start(steps)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2, weight_decay=0.1)
    sets, grads_left = [], []
    for batch in batches(kind, steps):
        model(**batch).loss.backward()
        grads_left.append(sum(p.grad is not None for p in engine.unmasked.params.values()))
        engine.step()
        sets.append({n: i.clone() for n, i in engine.unmasked.indices.items()})
        opt.step()
        opt.zero_grad()
    return model, engine, sets, grads_left


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("variant", ["default", "row_sparse", "per_tensor"])
def test_low_memory_selects_the_same_entries_and_gives_bitwise_equal_weights(
    model_name, variant, monkeypatch
):
    if variant == "row_sparse":  # tiny embeddings take the row-sparse path, in small chunks
        monkeypatch.setattr(sel, "ROW_SPARSE_MIN_ENTRIES", 1)
        monkeypatch.setattr(sel, "SCORE_CHUNK", 64)  # a tied output layer in blocks of 32 rows
    if variant == "per_tensor":
        monkeypatch.setattr(sel, "SMALL_TENSOR", 0)
    std_model, std, std_sets, std_left = run_plain(model_name, low_memory=False)
    low_model, low, low_sets, low_left = run_plain(model_name, low_memory=True)
    assert not std.low_memory_active and low.low_memory_active
    assert low.streamed_tables == (TIED.get(model_name, []) if variant == "row_sparse" else [])
    assert len(low.unmasked) == low.budget == 300
    for step, (a, b) in enumerate(zip(std_sets, low_sets)):
        for name in a:  # same entries, joined in the same order
            assert torch.equal(a[name], b[name]), (step, name)
    for (name, a), b in zip(std_model.state_dict().items(), low_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert min(std_left) > 0 and max(low_left) == 0  # low-memory: no selectable gradient outlives backward


@pytest.mark.parametrize("model_name", ["bert", "tied_llama"])
def test_low_memory_under_gradient_checkpointing(model_name):
    """Recomputed layers complete their gradients in the recompute-backward: the hooks see each one once."""
    std_model, _, std_sets, _ = run_plain(model_name, low_memory=False, checkpointing=True)
    low_model, low, low_sets, low_left = run_plain(model_name, low_memory=True, checkpointing=True)
    assert low.low_memory_active and max(low_left) == 0
    assert all(torch.equal(a[n], b[n]) for a, b in zip(std_sets, low_sets) for n in a)
    for a, b in zip(std_model.state_dict().values(), low_model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model_name", list(TIED))
def test_a_tied_tables_gradient_is_never_built_whole(model_name, monkeypatch):
    """The point of streaming a tied table: no (vocab x width) tensor exists in backward, in either mode it
    would otherwise: the output layer's dense contribution, or the sum autograd keeps until the embedding's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:  # dense storage only
                    self.seen.add((tuple(t.shape), t.untyped_storage().data_ptr()))
            return out

    monkeypatch.setattr(sel, "ROW_SPARSE_MIN_ENTRIES", 1)
    monkeypatch.setattr(sel, "SCORE_CHUNK", 64)  # blocks of 32 rows (of 100)
    make, kind = MODELS[model_name]
    table_shapes = {}
    for streamed in (False, True):
        model = make()
        table = dict(model.named_parameters())[TIED[model_name][0]]
        engine = ID3Engine(model, ID3Config(budget=300, low_memory=True, sparse_embedding_grads=streamed))
        engine.start(3)
        assert engine.streamed_tables == (TIED[model_name] if streamed else [])
        loss = model(**next(batches(kind, 1))).loss
        with Shapes() as shapes:
            loss.backward()
        engine.step()
        weight = table.untyped_storage().data_ptr()  # views of the weight (detach, slices) are no gradient
        table_shapes[streamed] = any(shape == table.shape and at != weight for shape, at in shapes.seen)
        assert len(engine.unmasked) == 100
    assert table_shapes == {False: True, True: False}


def test_a_third_use_of_a_streamed_table_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(sel, "ROW_SPARSE_MIN_ENTRIES", 1)
    model = tied_llama()
    engine = ID3Engine(model, ID3Config(budget=300, low_memory=True))
    engine.start(3)
    assert engine.streamed_tables
    loss = model(**next(batches("lm", 1))).loss
    loss = loss + model.model.embed_tokens.weight.pow(2).sum()  # a dense gradient from outside both modules
    with pytest.raises(RuntimeError, match="sparse_embedding_grads=False"):
        loss.backward()


def test_low_memory_with_exponent_and_a_budget_reached_early():
    """exp != 1 takes the pow path; once the budget is spent (k = 0) the hooks only stash and free."""
    _, std, std_sets, _ = run_plain(
        "bert", low_memory=False, steps=6, budget=50, exp=2.0, scheduler="exponential"
    )
    _, low, low_sets, _ = run_plain(
        "bert", low_memory=True, steps=6, budget=50, exp=2.0, scheduler="exponential"
    )
    assert [sum(i.numel() for i in s.values()) for s in low_sets][-1] == 50
    assert all(torch.equal(a[n], b[n]) for a, b in zip(std_sets, low_sets) for n in a)


def test_dense_gradient_is_freed_and_the_unmasked_values_are_kept():
    model = tiny_bert()
    engine = ID3Engine(model, ID3Config(budget=100, low_memory=True, dense="classifier"))
    engine.start(4)
    batch = next(batches("cls", 1))
    model(**batch).loss.backward()
    engine.step()
    assert all(p.grad is None for p in engine.unmasked.params.values())
    assert all(p.grad is not None for p in engine.unmasked.dense.values())  # dense tensors keep theirs
    stash = engine.unmasked.grad_stash
    assert sum(v.numel() for v in stash.values()) == len(engine.unmasked) == 25
    # the kept values are the true gradient values of the unmasked entries
    ref = tiny_bert()
    ref(**batch).loss.backward()
    for name, p in ref.named_parameters():
        if name in stash:
            assert torch.equal(stash[name], p.grad.reshape(-1)[engine.unmasked.indices[name]])
    norm = engine.grad_norm()  # what the Trainer logs: unmasked entries + dense tensors
    want = torch.sqrt(
        sum((v.double() ** 2).sum() for v in stash.values())
        + sum((p.grad.double() ** 2).sum() for p in engine.unmasked.dense.values())
    )
    assert torch.allclose(norm.double(), want, rtol=1e-5)


def test_engine_norm_equals_the_trainers_pass_over_masked_gradients():
    model = tiny_bert()
    engine = ID3Engine(model, ID3Config(budget=100, dense="classifier"))
    engine.start(4)
    model(**next(batches("cls", 1))).loss.backward()
    engine.step()
    want = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert torch.allclose(engine.grad_norm(), want, rtol=1e-5)


def test_a_second_backward_before_step_is_refused():
    model = tiny_bert()
    engine = ID3Engine(model, ID3Config(budget=100, low_memory=True))
    engine.start(4)
    batch = next(batches("cls", 1))
    model(**batch).loss.backward()
    with pytest.raises(RuntimeError, match="one backward per step"):
        model(**batch).loss.backward()


@pytest.mark.parametrize(
    "settings, config, needle",
    [
        ({"accumulation_steps": 4}, {}, "gradient_accumulation_steps=4"),
        ({"loss_scaling": True}, {}, "fp16 loss scaling"),
        ({}, {"optimizer": "trainer"}, "optimizer='trainer'"),
        ({}, {"method": "pafi"}, "method='pafi'"),
    ],
)
def test_settings_it_cannot_handle_warn_and_fall_back(settings, config, needle):
    with pytest.warns(UserWarning, match=needle):
        engine = ID3Engine(
            tiny_bert(),
            ID3Config(budget=100, low_memory=True, **config),
            settings=TrainingSettings(**settings),
        )
    assert not engine.low_memory
    engine.start(4)
    assert not engine.low_memory_active
    assert needle in engine.summary()  # the plan's reason, in the summary line


def test_fp16_loss_scale_is_refused_in_a_plain_loop():
    model = tiny_bert()
    engine = ID3Engine(model, ID3Config(budget=100, low_memory=True))
    engine.start(4)
    (model(**next(batches("cls", 1))).loss * 1024).backward()
    with pytest.raises(ValueError, match="loss scaling"):
        engine.step(grad_scale=1024.0)


class GradsBeforeOptimizer(TrainerCallback):
    """Records, just before each optimizer step, how many selectable tensors still hold a dense gradient."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.engine = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.counts.append(sum(p.grad is not None for p in self.engine.unmasked.params.values()))
        self.streamed = self.engine.streamed_tables


def train(tmp_path, low_memory: bool, model_name: str = "bert", **args):
    make, kind = MODELS[model_name]
    callback = ID3Callback(ID3Config(budget=120, low_memory=low_memory))
    probe = GradsBeforeOptimizer()
    data = token_data(n=48, kind=kind)
    trainer = ID3Trainer(
        model=make(),
        args=training_args(tmp_path / str(low_memory), logging_steps=1, weight_decay=0.01, **args),
        train_dataset=data,
        eval_dataset=token_data(n=8, kind=kind, seed=1),
        callbacks=[callback, probe],
    )
    probe.engine = trainer.engine
    trainer.train()
    trainer.grads_before_optimizer, trainer.streamed = probe.counts, probe.streamed
    return trainer


def test_through_the_trainer_same_weights_and_grad_norm(tmp_path):
    std = train(tmp_path, low_memory=False, max_grad_norm=0.0)
    low = train(tmp_path, low_memory=True, max_grad_norm=0.0)
    assert low.engine.low_memory and not std.engine.low_memory
    assert std.engine.unmasked.fingerprint() == low.engine.unmasked.fingerprint()
    for a, b in zip(std.model.state_dict().values(), low.model.state_dict().values()):
        assert torch.equal(a, b)
    assert min(std.grads_before_optimizer) > 0 and max(low.grads_before_optimizer) == 0
    # hooks go at train end: a later backward keeps its gradients
    assert not low.engine.low_memory_active
    low.model(**next(batches("cls", 1))).loss.backward()
    assert all(p.grad is not None for p in low.model.parameters())
    if trainer_clips_inline():  # transformers 4.x logs no grad_norm without clipping
        return
    norms = [[h["grad_norm"] for h in t.state.log_history if "grad_norm" in h] for t in (std, low)]
    assert len(norms[0]) == len(norms[1]) == 6
    # the same quantity from dense masked gradients vs kept values: equal up to float rounding
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    assert all(n > 0 for n in norms[1])


def test_through_the_trainer_clipping_runs_in_low_memory_mode(tmp_path):
    # clipping goes through engine.clip_grad_norm_, which scales the kept gradient values: no fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        std = train(tmp_path, low_memory=False, max_grad_norm=0.05)
        low = train(tmp_path, low_memory=True, max_grad_norm=0.05)
    assert low.engine.low_memory and max(low.grads_before_optimizer) == 0
    norms = [h["grad_norm"] for h in low.state.log_history if "grad_norm" in h]
    assert min(norms) > 0.05  # the clip binds on every step
    assert std.engine.unmasked.fingerprint() == low.engine.unmasked.fingerprint()
    for a, b in zip(std.model.state_dict().values(), low.model.state_dict().values()):
        assert torch.equal(a, b)
    unclipped = train(tmp_path / "unclipped", low_memory=True, max_grad_norm=0.0)
    assert not torch.equal(unclipped.model.classifier.weight, low.model.classifier.weight)


def test_through_the_trainer_a_tied_table_streams_with_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(sel, "ROW_SPARSE_MIN_ENTRIES", 1)
    monkeypatch.setattr(sel, "SCORE_CHUNK", 64)  # the output layer's gradient in blocks of 32 rows
    # clipping that binds, and evaluations (no-grad forwards of the output layer) between the steps
    args = dict(model_name="tied_llama", max_grad_norm=0.05, eval_strategy="steps", eval_steps=2)
    std = train(tmp_path, low_memory=False, **args)
    low = train(tmp_path, low_memory=True, **args)
    assert low.streamed == ["model.embed_tokens.weight"] and std.streamed == []
    assert max(low.grads_before_optimizer) == 0
    assert std.engine.unmasked.fingerprint() == low.engine.unmasked.fingerprint()
    for a, b in zip(std.model.state_dict().values(), low.model.state_dict().values()):
        assert torch.equal(a, b)
    evals = [[h["eval_loss"] for h in t.state.log_history if "eval_loss" in h] for t in (std, low)]
    assert len(evals[0]) == 3 and evals[0] == evals[1]
    assert "forward" not in low.model.lm_head.__dict__  # the output layer's own forward again after training


def test_through_the_trainer_accumulation_falls_back(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(tmp_path, low_memory=True, max_grad_norm=0.0, gradient_accumulation_steps=2)
    assert any("gradient_accumulation_steps=2" in str(w.message) for w in caught)
    assert not trainer.engine.low_memory_active
    assert len(trainer.engine.unmasked) == trainer.engine.budget
