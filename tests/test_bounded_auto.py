"""`ID3Config(weight_grads="auto")`, the default: the bounded path where it is the faster one and nothing it
cannot see could break it (under ID3Trainer, CPU weights, native kernels built, no torch.compile), dense
gradients elsewhere with the reason in the plan's summary and no warning. And the case no plan can see in
advance: a layer that runs twice in one step's forward (ALBERT shares its layers) turns dense, exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import (
    assert_added_top_k,
    dense_reference,
    tiny_bert,
    tiny_llama,
    token_batches,
    token_data,
    training_args,
)
from torch import nn

from id3_callback import ID3Config, ID3Engine, SparseAdamW, bounded_costs, native, selection
from id3_callback.plan import TrainingSettings, auto_blockers

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINER = TrainingSettings(grads_through_engine=True)  # what ID3Trainer hands the engine
needs_native = pytest.mark.skipif(
    native.library(warn=False) is None, reason="no C compiler here: 'auto' keeps dense gradients"
)


@pytest.fixture(autouse=True)
def small_layers(monkeypatch):
    """Every selectable Linear of the tiny models is large enough for the bounded path."""
    monkeypatch.setattr(selection, "BOUNDED_MIN_ENTRIES", 0)
    monkeypatch.setattr(bounded_costs, "FIXED_TOKENS", 0)


def _engine(model, settings=TRAINER, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'auto' never warns about its choice
        return ID3Engine(model, ID3Config(budget=60, **config), settings=settings)


def test_auto_is_the_default():
    assert ID3Config().weight_grads == "auto"


@needs_native
def test_auto_under_the_trainer_takes_the_bounded_path():
    engine = _engine(tiny_bert())
    assert engine.plan.bounded_layers and not engine.plan.bounded_blockers
    assert engine.plan.recompute  # on with the bounded path, as for 'bounded'
    assert "bounded weight gradients (no dense dW)" in "\n".join(
        engine.plan.bounded_lines(engine.branch_costs.summary())
    )


@needs_native
def test_id3trainer_trains_with_the_bounded_path_by_default(tmp_path):
    from id3_callback import ID3Callback, ID3Trainer
    from id3_callback.logging import MaskHeatmapCallback

    model = tiny_bert()
    trainer = ID3Trainer(
        model=model,
        args=training_args(tmp_path, per_device_train_batch_size=4, max_grad_norm=1.0),
        train_dataset=token_data(n=24, seq=8, kind="cls"),
        callbacks=[ID3Callback(ID3Config(budget=60))],
    )
    trainer.remove_callback(MaskHeatmapCallback)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(cpu|CPU|pin_memory|num_items).*")
        trainer.train()
    assert trainer.engine.plan.bounded_layers and len(trainer.engine.unmasked) == 60
    assert any("id3/bound_survivors" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize(
    "settings, config, env, reason",
    [
        (TrainingSettings(), {}, "1", "outside ID3Trainer"),
        (TRAINER, {}, "0", "without the native kernels (torch code (ID3_NATIVE=0)"),
        (TrainingSettings(grads_through_engine=True, compiled=True), {}, "1", "torch.compile"),
        (TrainingSettings(grads_through_engine=True, accumulation_steps=2), {}, "1", "accumulation_steps=2"),
        (TRAINER, {"low_memory": True}, "1", "low_memory=True"),
    ],
)
def test_auto_keeps_dense_gradients_where_bounded_is_not_the_better_path(
    settings, config, env, reason, monkeypatch
):
    monkeypatch.setenv("ID3_NATIVE", env)
    engine = _engine(tiny_bert(), settings, **config)
    assert not engine.plan.bounded_layers
    assert engine.plan.recompute is bool(config)  # here only low-memory mode turns recomputation on
    assert reason in " ".join(engine.plan.bounded_blockers)
    assert "bounded weight gradients off" in engine.summary()


def test_auto_is_silent_for_methods_that_never_take_the_bounded_path():
    engine = _engine(tiny_bert(), method="random")
    assert not engine.plan.bounded_layers and not engine.plan.bounded_blockers
    assert "bounded weight gradients" not in engine.summary()


def test_auto_keeps_dense_gradients_for_weights_off_the_cpu():
    weights = {"w": nn.Parameter(torch.empty(4, 4, device="meta"))}
    (reason,) = auto_blockers(weights, TRAINER)
    assert "weights on meta" in reason


# ----------------------------------------------------------------------------- a layer used twice per step
def tiny_albert(seed: int = 0):
    """ALBERT applies one shared layer group at every depth: each of its Linear layers runs 3 times."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.manual_seed(seed)
    config = AlbertConfig(
        vocab_size=100,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0,
    )
    return AlbertForSequenceClassification(config)


def test_a_shared_layer_turns_dense_and_the_selection_stays_exact():
    model = tiny_albert().eval()
    reference = tiny_albert().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = ID3Engine(model, ID3Config(budget=300, weight_grads="bounded"))
        dense = ID3Engine(reference, ID3Config(budget=300, weight_grads="dense"))
    engine.start(5)
    dense.start(5)
    shared = "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn.weight"
    assert shared in engine.bounded.layers
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    ref_opt = SparseAdamW(dense.parameters(), dense.unmasked, lr=1e-2)
    batches = list(token_batches("cls", steps=5))
    for step, batch in enumerate(batches):
        scores, grads = dense_reference(model, engine, batch)
        k = engine.schedule.target(engine.steps_done + 1) - len(engine.unmasked)
        before = {n: i.numel() for n, i in engine.unmasked.indices.items()}
        if step == 0:
            with pytest.warns(UserWarning, match="runs more than once per step"):
                model(**batch).loss.backward()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # once per layer, not per step
                model(**batch).loss.backward()
        # The shared layers' dense gradient is the sum over their uses, the first (bounded) use included.
        assert shared not in engine.bounded.layers and shared in engine.bounded.demoted
        torch.testing.assert_close(engine.unmasked.params[shared].grad.view(-1), grads[shared])
        engine.step()
        assert_added_top_k(engine, before, k, scores)
        opt.step()
        opt.zero_grad()
        reference(**batch).loss.backward()
        dense.step()
        ref_opt.step()
        ref_opt.zero_grad()
    assert engine.bounded.layers  # the layers used once (the pooler, the classifier) stay bounded
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_without_counting_a_second_use(reentrant):
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()  # checkpointing runs in training mode only (the tiny Llama has no dropout)
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # lm_head not selectable: the first bounded backward is inside the last checkpoint, after its
        # recomputation has run the layers' forwards again
        engine = ID3Engine(model, ID3Config(budget=300, weight_grads="bounded", exclude="lm_head"))
    engine.start(4)
    layers = set(engine.bounded.layers)
    for batch in token_batches("lm", steps=3):
        scores, _ = dense_reference(model, engine, batch)
        k = engine.schedule.target(engine.steps_done + 1) - len(engine.unmasked)
        before = {n: i.numel() for n, i in engine.unmasked.indices.items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*more than once per step")
            model(**batch).loss.backward()
        engine.step()
        assert_added_top_k(engine, before, k, scores)
    assert set(engine.bounded.layers) == layers and not engine.bounded.demoted
