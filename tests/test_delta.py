"""Sparse deltas: exact round trip, O(B) size, and refusals that leave the model untouched."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import snapshot, tiny_bert, token_data, training_args

from id3_callback import ID3Callback, ID3Config, ID3Trainer, apply_delta, load_delta, remove_delta, save_delta
from id3_callback.delta import DeltaError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("delta")
    model = tiny_bert()
    callback = ID3Callback(ID3Config(budget=500))
    trainer = ID3Trainer(
        model=model,
        args=training_args(tmp, weight_decay=0.1),
        train_dataset=token_data(),
        callbacks=[callback],
    )
    trainer.train()
    path = save_delta(trainer, tmp / "model.delta.safetensors")
    return trainer, path, tmp


def logits(model):
    model.eval()
    batch = token_data(n=8, seed=5)[:]
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_base_plus_delta_is_the_fine_tuned_model_bitwise(trained):
    trainer, path, _ = trained
    base = tiny_bert()  # same seed: the pre-training weights
    original = snapshot(base)
    apply_delta(base, path)
    for (name, a), b in zip(trainer.model.named_parameters(), base.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(logits(base), logits(trainer.model))
    remove_delta(base)
    for name, p in base.named_parameters():
        assert torch.equal(p, original[name]), name


def test_delta_is_o_of_b_on_disk(trained):
    trainer, path, _ = trained
    entries = len(trainer.engine.unmasked)
    delta = load_delta(path)
    assert delta.num_entries == entries == 500
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    payload = os.path.getsize(path) - 8 - header
    assert payload <= 8.0 * entries  # int32 index + fp32 value
    assert os.path.getsize(path) <= 8.5 * entries + 8 + header
    meta = delta.metadata
    assert meta["method"] == "id3" and meta["budget"] == "500" and meta["scheduler"] == "uniform"
    assert float(meta["eps"]) == 1e-3 and float(meta["exp"]) == 1.0
    assert all(idx.dtype == torch.long for idx, _ in delta.sparse.values())


def test_indices_stored_as_int32(trained):
    from safetensors import safe_open

    _, path, _ = trained
    with safe_open(path, framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("::indices")}
    assert dtypes == {"I32"}


def test_no_temp_files_left_behind_and_normal_permissions(trained):
    _, path, tmp = trained
    assert not [f for f in os.listdir(tmp) if f.startswith(".tmp-")]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0600


def rewrite(path, out, mutate_tensors=None, mutate_meta=None, fix_payload=True):
    """Copy a delta with a modification, optionally re-signing the payload so only the target check fires."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from id3_callback.delta import _payload_sha

    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_meta:
        mutate_meta(meta)
    if fix_payload:
        meta["payload_sha256"] = _payload_sha(tensors, meta)
    save_file(tensors, out, metadata=meta)
    return out


def first_key(tensors, suffix):
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def rename_first(t):
    key = first_key(t, "::indices")
    name = key.rpartition("::")[0]
    t["not.a.param::indices"], t["not.a.param::values"] = t.pop(key), t.pop(f"{name}::values")


def out_of_range(t):
    key = first_key(t, "::indices")
    t[key] = t[key].clone()
    t[key][-1] = 10**8


def drop_value(t):
    key = first_key(t, "::values")
    t[key] = t[key][:-1].clone()


@pytest.mark.parametrize(
    "mutate_tensors, mutate_meta, fix_payload, needle",
    [
        (rename_first, None, True, "not a parameter of this model"),
        (out_of_range, None, True, "out of range"),
        (drop_value, None, True, "indices but"),
        (None, lambda m: m.update(format="other"), True, "not an id3 delta"),
        (out_of_range, None, False, "corrupted"),
        (
            lambda t: t.update({first_key(t, "::values"): t[first_key(t, "::values")].double()}),
            None,
            True,
            "float64",
        ),
    ],
)
def test_bad_deltas_are_refused_and_the_model_untouched(
    trained, mutate_tensors, mutate_meta, fix_payload, needle
):
    _, path, tmp = trained
    bad = rewrite(path, str(tmp / "bad.safetensors"), mutate_tensors, mutate_meta, fix_payload)
    base = tiny_bert()
    before = snapshot(base)
    with pytest.raises(DeltaError, match=needle):
        apply_delta(base, bad)
    for name, p in base.named_parameters():
        assert torch.equal(p, before[name])


def test_delta_for_another_base_is_refused(trained):
    _, path, _ = trained
    other = tiny_bert(seed=1)  # same architecture, other weights
    before = snapshot(other)
    with pytest.raises(DeltaError, match="checksum mismatch"):
        apply_delta(other, path)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    apply_delta(other, path, check_base=False)  # the escape hatch works
    remove_delta(other)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())


def test_shape_mismatch_for_dense_tensor_is_refused(tmp_path):
    from helpers import MLP, mlp_data

    model = MLP()
    trainer = ID3Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=mlp_data(),
        callbacks=[ID3Callback(ID3Config(budget=10, dense=r"net\.2\."))],
    )
    trainer.train()
    path = save_delta(trainer, tmp_path / "d.safetensors")
    # Trained whole: no base checksum (they replace the base tensor), so any base of this shape takes them.
    assert not json.loads(load_delta(path).metadata["base_sha256"]).keys() & {"net.2.weight", "net.2.bias"}
    fresh = MLP()
    apply_delta(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    wrong = MLP(classes=4)
    with pytest.raises(DeltaError, match="does not fit"):
        apply_delta(wrong, path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(DeltaError, match="not a readable safetensors file"):
        apply_delta(tiny_bert(), path)
    with pytest.raises(DeltaError, match="no delta file"):
        load_delta(tmp_path / "missing.safetensors")
