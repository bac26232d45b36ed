"""Mask logging: name parsing, the density grid, the heatmap PNG, and a W&B offline run's media files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_bert, tiny_t5, token_data, training_args

from id3_callback import ID3Callback, ID3Config, ID3Engine, ID3Trainer
from id3_callback.logging import (
    ID3WandbCallback,
    MaskHeatmapCallback,
    density_grid,
    parse_param_name,
    save_heatmap,
    tensor_counts,
)
from id3_callback.logging.plots import OTHER_ROW


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "bert.encoder.layer.3.attention.self.query.weight",
            ("bert.encoder.layer", 3, "attention.self.query.weight"),
        ),
        ("model.layers.11.mlp.down_proj.weight", ("model.layers", 11, "mlp.down_proj.weight")),
        (
            "decoder.block.1.layer.0.SelfAttention.q.weight",
            ("decoder.block", 1, "layer.0.SelfAttention.q.weight"),
        ),
        (
            "base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight",
            ("encoder.layer", 0, "attention.self.query.lora_A.default.weight"),
        ),
        ("0.weight", ("", 0, "weight")),
        ("bert.embeddings.word_embeddings.weight", (None, None, "bert.embeddings.word_embeddings.weight")),
    ],
)
def test_parse_param_name(name, expected):
    assert parse_param_name(name) == expected


def grown_engine(model, budget=300, steps=2) -> ID3Engine:
    engine = ID3Engine(
        model, ID3Config(budget=budget, dense="classifier" if hasattr(model, "classifier") else None)
    )
    engine.start(steps)
    data = token_data(n=8, kind="cls" if hasattr(model, "classifier") else "s2s")
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in data[0]}
    for _ in range(steps):
        model.zero_grad()
        model(**batch).loss.backward()
        engine.step()
    return engine


def test_engine_exposes_scores_of_the_last_selection():
    engine = grown_engine(tiny_bert(), budget=300, steps=2)
    scores = engine.last_selected_scores
    assert scores is not None and scores.numel() == 150  # the second step's share
    assert torch.isfinite(scores).all() and bool((scores[:-1] >= scores[1:]).all())  # best first


def test_density_grid_counts_every_unmasked_entry_once():
    engine = grown_engine(tiny_bert(), budget=300)
    records = tensor_counts(engine)
    grid = density_grid(records)
    assert grid.rows == ["layer.0", "layer.1", OTHER_ROW]
    assert grid.unmasked.sum() == len(engine.unmasked) == 300
    assert grid.numel.sum() == engine.selectable  # dense classifier left out of the grid ...
    dense = [r for r in records if r["dense"]]
    assert {r["name"] for r in dense} == {"classifier.weight", "classifier.bias"}  # ... but in the records
    assert all(r["density"] == 1.0 for r in dense)
    d = grid.density
    assert ((d >= 0) & (d <= 1) | ~(d == d)).all()


def test_density_grid_keeps_encoder_and_decoder_stacks_apart():
    engine = grown_engine(tiny_t5(), budget=200)
    grid = density_grid(tensor_counts(engine))
    assert {"encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"} <= set(grid.rows)
    assert grid.unmasked.sum() == 200


def test_save_heatmap_writes_a_png(tmp_path):
    from PIL import Image

    engine = grown_engine(tiny_bert())
    path = save_heatmap(engine, tmp_path / "sub" / "heat.png", step=2)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300


def test_trainer_saves_heatmap_png_without_wandb(tmp_path):
    args = training_args(tmp_path, max_steps=2)
    trainer = ID3Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=token_data(),
        callbacks=[ID3Callback(ID3Config(budget=100))],
    )
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert MaskHeatmapCallback in kinds and ID3WandbCallback not in kinds
    trainer.train()
    assert (Path(args.output_dir) / "mask_density.png").stat().st_size > 10_000


def test_wandb_offline_run_has_heatmaps_tables_histograms_and_delta(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "id3-test")
    args = training_args(tmp_path, max_steps=4, logging_steps=2, report_to=["wandb"])
    trainer = ID3Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=token_data(),
        callbacks=[ID3Callback(ID3Config(budget=400, dense="classifier")), ID3WandbCallback(heatmap_steps=2)],
    )
    ours = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ID3WandbCallback)]
    assert len(ours) == 1 and ours[0].id3 is trainer.id3  # the user's instance is bound, no second one added
    try:
        trainer.train()
        run_dir = Path(wandb.run.dir).parent
    finally:
        wandb.finish()

    images = sorted((run_dir / "files" / "media" / "images" / "id3").glob("mask_density_*.png"))
    assert len(images) == 2  # step 2 and the end (step 4)
    tables = run_dir / "files" / "media" / "table" / "id3"
    per_tensor = json.loads(next(tables.glob("unmasked_per_tensor_*.table.json")).read_text())
    assert next(tables.glob("unmasked_per_layer_*.table.json"), None) is not None
    assert per_tensor["columns"] == ["name", "layer", "module", "unmasked", "numel", "density", "dense"]
    selected = [row for row in per_tensor["data"] if not row[-1]]
    assert sum(row[3] for row in selected) == 400
    assert any(row[1] == 1 and row[2].startswith("attention") for row in per_tensor["data"])
    # Scalars, histograms and the artifact go into the run's binary log.
    # The wandb service may still be flushing the log after finish() returns on a loaded machine: poll briefly.
    keys = (b"train/id3/budget_used", b"id3/selected_score_log10", b"id3/unmasked_per_layer", b"id3-delta")
    deadline = time.monotonic() + 60
    while True:
        log = b"".join(path.read_bytes() for path in run_dir.glob("*.wandb"))
        if all(key in log for key in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for key in keys:
        assert key in log, key
    assert (Path(args.output_dir) / "delta.safetensors").exists()
    assert (Path(args.output_dir) / "mask_density.png").exists()


def test_tensor_counts_see_fully_unmasked_tensors():
    from helpers import MLP

    from id3_callback.logging.plots import tensor_counts

    with pytest.warns(UserWarning, match="trains every selectable entry"):
        engine = ID3Engine(MLP(), ID3Config(method="full"))
    engine.start(1)
    records = tensor_counts(engine)
    assert sum(r["unmasked"] for r in records) == engine.selectable == 195
    assert all(r["density"] == 1.0 for r in records)
