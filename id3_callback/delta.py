"""Sparse deltas: the fine-tuned values of the unmasked entries, O(B) on disk, exact on reload.

File layout (safetensors): for each tensor `name`, `name::indices` (sorted flat indices, int32 unless the
tensor needs int64) and `name::values` (fine-tuned values in the parameter dtype: values rather than
differences, since a float difference does not round-trip bitwise). Dense tensors store `name::dense`.
Metadata: the ID3 settings, the base model's name, a SHA-256 per tensor of the base values the delta
overwrites, and one over the payload, so a delta for another base model or a corrupted file is refused
before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .io import _sha, atomic_write

FORMAT = "id3-delta/1"


class DeltaError(ValueError):
    """The delta does not fit this model, or the file is damaged. The model was not modified."""


def _engine_of(source: Any):
    from .engine import ID3Engine

    if isinstance(source, ID3Engine):
        return source
    for attr in ("engine", "id3"):
        inner = getattr(source, attr, None)
        if inner is not None:
            return _engine_of(inner)
    raise TypeError(f"save_delta needs an ID3Trainer, ID3Callback or ID3Engine, got {type(source).__name__}.")


def _base_model_name(engine) -> str:
    config = getattr(engine.model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "")


def save_delta(source: Any, path: str | os.PathLike, base_model: str | None = None) -> str:
    """Write the unmasked entries' fine-tuned values to `path` (safetensors, atomically).

    `source` is an `ID3Trainer`, `ID3Callback` or `ID3Engine`.

    Example:
        >>> save_delta(trainer, "outputs/sst2.delta.safetensors")  # doctest: +SKIP

    Under DDP this is a collective, like `trainer.save_model`: call it on every rank. The ranks compare
    their states (`check_consistency`), rank 0 writes, and all return once the file is complete.
    """
    from .distributed import barrier, check_consistency, is_main_process

    engine = _engine_of(source)
    check_consistency(engine, f"save_delta({os.fspath(path)!r})")
    if is_main_process():
        _write_delta(engine, path, base_model)
    barrier()
    return os.fspath(path)


def _write_delta(engine, path: str | os.PathLike, base_model: str | None) -> str:
    from safetensors.torch import save_file

    unmasked = engine.unmasked
    tensors: dict[str, torch.Tensor] = {}
    base_sha: dict[str, str] = {}
    for name, p in unmasked.params.items():
        if name in unmasked.full:  # unmasked whole (method 'full'): stored like a dense tensor
            tensors[f"{name}::dense"] = p.detach().cpu().contiguous()
            base_sha[name] = unmasked.full[name]
            continue
        idx, base = unmasked.trained_indices(name)  # every entry ever unmasked (repeat-S swaps sets)
        if idx.numel() == 0:
            continue
        index_dtype = torch.int32 if p.numel() <= torch.iinfo(torch.int32).max else torch.int64
        tensors[f"{name}::indices"] = idx.to(index_dtype).cpu()
        tensors[f"{name}::values"] = p.detach().reshape(-1)[idx].cpu()
        base_sha[name] = _sha(base)
    for name, p in unmasked.dense.items():
        tensors[f"{name}::dense"] = p.detach().cpu().contiguous()
        base_sha[name] = _sha(unmasked.dense_base[name])
    payload = hashlib.sha256()
    for key in sorted(tensors):
        payload.update(key.encode())
        payload.update(_sha(tensors[key]).encode())
    config = engine.config
    metadata = {
        "format": FORMAT,
        "method": config.method,
        "budget": str(engine.budget),
        "unmasked": str(len(unmasked)),
        "dense_entries": str(engine.dense_entries),
        "eps": repr(config.eps),
        "exp": repr(config.exp),
        "scheduler": config.scheduler,
        "steps": str(engine.steps_done),
        "base_model": base_model if base_model is not None else _base_model_name(engine),
        "base_sha256": json.dumps(base_sha, sort_keys=True),
        "payload_sha256": payload.hexdigest(),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


@dataclass
class Delta:
    """A loaded, integrity-checked delta."""

    metadata: dict[str, str]
    sparse: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )  # name -> (idx, values)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_entries(self) -> int:
        return sum(i.numel() for i, _ in self.sparse.values()) + sum(v.numel() for v in self.dense.values())


def load_delta(path: str | os.PathLike) -> Delta:
    """Read and verify a delta file (format tag, layout, payload checksum). Raises `DeltaError`."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise DeltaError(f"no delta file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises several types for damaged files
        raise DeltaError(
            f"{path} is not a readable safetensors file ({err}); re-save or re-download it."
        ) from None
    if metadata.get("format") != FORMAT:
        raise DeltaError(
            f"{path} is not an id3 delta (format {metadata.get('format')!r}, expected {FORMAT!r})."
        )
    payload = hashlib.sha256()
    for key in sorted(tensors):
        payload.update(key.encode())
        payload.update(_sha(tensors[key]).encode())
    if payload.hexdigest() != metadata.get("payload_sha256"):
        raise DeltaError(f"{path} is corrupted: its payload checksum does not match. Re-save the delta.")
    delta = Delta(metadata)
    for key, t in tensors.items():
        name, _, kind = key.rpartition("::")
        if kind == "dense":
            delta.dense[name] = t
        elif kind == "indices":
            delta.sparse[name] = (t.long(), tensors[f"{name}::values"])
    return delta


@dataclass
class AppliedDelta:
    """What `apply_delta` overwrote, to restore the base model bitwise."""

    sparse: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dense: dict[str, torch.Tensor]


def apply_delta(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> AppliedDelta:
    """Write a delta's values into `model`, after checking that it fits; returns what was overwritten.

    Raises `DeltaError` (model untouched) when a tensor is missing, shapes or indices do not fit, or the
    base values differ from those the delta was trained from (`check_base=False` skips only that check).

    Example:
        >>> apply_delta(base_model, "outputs/sst2.delta.safetensors")  # doctest: +SKIP
        >>> remove_delta(base_model)                                     # doctest: +SKIP
    """
    delta = load_delta(path)
    params = dict(model.named_parameters())
    base_sha = json.loads(delta.metadata.get("base_sha256", "{}"))
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    saved_dense: dict[str, torch.Tensor] = {}
    for name, (idx, values) in delta.sparse.items():
        p = params.get(name)
        if p is None:
            raise DeltaError(
                f"delta tensor {name!r} is not a parameter of this model: was it made for another base?"
            )
        if idx.numel() != values.numel():
            raise DeltaError(
                f"{name}: {idx.numel()} indices but {values.numel()} values; the file is inconsistent."
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
            raise DeltaError(
                f"{name}: index {int(idx.max())} out of range for a tensor of {p.numel()} entries."
            )
        if values.dtype != p.dtype:
            raise DeltaError(f"{name}: delta values are {values.dtype}, the model's parameter is {p.dtype}.")
        old = p.detach().reshape(-1)[idx.to(p.device)].clone()
        if check_base and base_sha.get(name) != _sha(old):
            raise DeltaError(
                f"{name}: the base values differ from those this delta was trained from (checksum mismatch); "
                f"it belongs to base model {delta.metadata.get('base_model')!r}. Pass check_base=False to force."
            )
        saved[name] = (idx, old)
    for name, values in delta.dense.items():
        p = params.get(name)
        if p is None or p.shape != values.shape:
            got = None if p is None else tuple(p.shape)
            raise DeltaError(
                f"dense delta tensor {name!r} of shape {tuple(values.shape)} does not fit (model: {got})."
            )
        if check_base and base_sha.get(name) != _sha(p.detach()):
            raise DeltaError(f"{name}: base values differ from the delta's base (checksum mismatch).")
        saved_dense[name] = p.detach().clone()
    with torch.no_grad():  # everything checked: now write
        for name, (idx, values) in delta.sparse.items():
            params[name].view(-1)[idx.to(params[name].device)] = values.to(params[name].device)
        for name, values in delta.dense.items():
            params[name].copy_(values)
    applied = AppliedDelta(saved, saved_dense)
    stack = model.__dict__.setdefault("_id3_applied_deltas", [])
    stack.append(applied)
    return applied


def remove_delta(model: nn.Module, applied: AppliedDelta | None = None) -> None:
    """Restore the values the last (or the given) `apply_delta` overwrote, bitwise."""
    stack = model.__dict__.get("_id3_applied_deltas", [])
    if applied is None:
        if not stack:
            raise ValueError("no delta has been applied to this model.")
        applied = stack.pop()
    elif applied in stack:
        stack.remove(applied)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (idx, old) in applied.sparse.items():
            params[name].view(-1)[idx.to(params[name].device)] = old
        for name, old in applied.dense.items():
            params[name].copy_(old)
