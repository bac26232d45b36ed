"""Sparse deltas: the fine-tuned values of the unmasked entries, O(B) on disk, exact on reload.

File layout (safetensors): for each tensor `name`, `name::indices` (sorted flat indices, int32 unless the
tensor needs int64) and `name::values` (fine-tuned values in the parameter dtype: values rather than
differences, since a float difference does not round-trip bitwise). Tensors trained whole (`dense=...`, a
new head, method 'full') store `name::dense` and replace the base tensor completely, so they apply to any
base of the right shape and dtype. Metadata: the ID3 settings, the base model's name, a SHA-256 per sparse
tensor of the base values the delta overwrites, and one over the payload (tensors and, from format 2, the
metadata), so a delta for another base model or a corrupted file is refused before anything is written.
Format 1 files (whole tensors with a base checksum, ignored now) still load.
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

FORMAT = "id3-delta/2"
READABLE = ("id3-delta/1", FORMAT)


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
        if name in unmasked.full:  # unmasked whole (method 'full'): replaces the base tensor like a dense one
            tensors[f"{name}::dense"] = p.detach().cpu().contiguous()
            continue
        idx, base = unmasked.trained_indices(name)  # every entry ever unmasked (repeat-S swaps sets)
        if idx.numel() == 0:
            continue
        index_dtype = torch.int32 if p.numel() <= torch.iinfo(torch.int32).max else torch.int64
        tensors[f"{name}::indices"] = idx.to(index_dtype).cpu()
        tensors[f"{name}::values"] = p.detach().reshape(-1)[idx].cpu()
        base_sha[name] = _sha(base)
    for name, p in unmasked.dense.items():  # trained whole: no base checksum, any base of this shape will do
        tensors[f"{name}::dense"] = p.detach().cpu().contiguous()
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
    }
    metadata["payload_sha256"] = _payload_sha(tensors, metadata)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


@dataclass
class Delta:
    """A loaded, integrity-checked delta."""

    metadata: dict[str, str]
    sparse: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )  # name -> (idx, values)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> the whole trained tensor
    base_sha: dict[str, str] = field(default_factory=dict)  # name -> SHA-256 of the base values overwritten

    @property
    def num_entries(self) -> int:
        return sum(i.numel() for i, _ in self.sparse.values()) + sum(v.numel() for v in self.dense.values())


def _payload_sha(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Checksum over the tensors and (format 2) every metadata entry but itself."""
    payload = hashlib.sha256()
    for key in sorted(tensors):
        payload.update(key.encode())
        payload.update(_sha(tensors[key]).encode())
    if metadata.get("format") != "id3-delta/1":
        for key in sorted(k for k in metadata if k != "payload_sha256"):
            payload.update(f"\0{key}\0{metadata[key]}".encode())
    return payload.hexdigest()


def _read(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) from ONE read of the file: a writer replacing it meanwhile (atomically, by rename)
    leaves this descriptor on the old file, so the reader sees the old version or the new, never a mix."""
    from safetensors.torch import load

    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DeltaError(f"no delta file at {path}") from None
    except OSError as err:
        raise DeltaError(f"cannot read the delta file {path} ({err}).") from None
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        metadata = header.get("__metadata__") or {}
        tensors = load(data)
    except Exception as err:  # safetensors and json raise several types for damaged files
        raise DeltaError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); re-save or re-download it."
        ) from None
    if not isinstance(metadata, dict):
        raise DeltaError(f"{path} has a damaged header; re-save or re-download it.")
    return metadata, tensors


def load_delta(path: str | os.PathLike) -> Delta:
    """Read and verify a delta file (format tag, layout, payload checksum). Raises `DeltaError`.

    Example:
        >>> load_delta("outputs/sst2.delta.safetensors").num_entries  # doctest: +SKIP
        38612
    """
    path = os.fspath(path)
    metadata, tensors = _read(path)
    if metadata.get("format") not in READABLE:
        raise DeltaError(
            f"{path} is not an id3 delta this version reads (format {metadata.get('format')!r}, expected one of "
            f"{READABLE}): was it written by a newer id3_callback?"
        )
    if _payload_sha(tensors, metadata) != metadata.get("payload_sha256"):
        raise DeltaError(
            f"{path} is corrupted: its payload checksum does not match (damaged or truncated in transfer). "
            "Re-download it, or save it again from the trained model."
        )
    delta = Delta(metadata)
    kinds: dict[str, set[str]] = {}
    for key in tensors:
        name, _, kind = key.rpartition("::")
        kinds.setdefault(name, set()).add(kind)
    for name, found in kinds.items():
        if found == {"dense"}:
            delta.dense[name] = tensors[f"{name}::dense"]
            continue
        if found != {"indices", "values"}:
            parts = ", ".join(f"{name}::{k}" for k in sorted(found))
            raise DeltaError(
                f"{path}: tensor {name!r} has {parts}; a delta holds either {name}::indices with {name}::values, "
                f"or {name}::dense. The file was not written by save_delta, or was edited: save it again."
            )
        idx, values = tensors[f"{name}::indices"], tensors[f"{name}::values"]
        if idx.dim() != 1 or values.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise DeltaError(f"{path}: {name}::indices must be a 1-D integer tensor and ::values 1-D.")
        delta.sparse[name] = (idx.long(), values)
    try:
        base_sha = json.loads(metadata.get("base_sha256", "{}"))
    except ValueError as err:
        raise DeltaError(
            f"{path}: metadata base_sha256 is not valid JSON ({err}); save the delta again."
        ) from None
    if not isinstance(base_sha, dict) or not all(isinstance(v, str) for v in base_sha.values()):
        raise DeltaError(f"{path}: metadata base_sha256 is not a mapping of tensor names to checksums.")
    delta.base_sha = base_sha
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
    base_sha = delta.base_sha
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
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= p.numel():
                raise DeltaError(
                    f"{name}: index {lo if lo < 0 else hi} out of range for a tensor of {p.numel()} entries: "
                    "the delta was made for another model, or the file was edited."
                )
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise DeltaError(
                    f"{name}: indices are not sorted and unique; the file was not written by save_delta."
                )
        if values.dtype != p.dtype:
            raise DeltaError(f"{name}: delta values are {values.dtype}, the model's parameter is {p.dtype}.")
        old = p.detach().reshape(-1)[idx.to(p.device)].clone()
        if check_base and base_sha.get(name) != _sha(old):
            raise DeltaError(
                f"{name}: the base values differ from those this delta was trained from (checksum mismatch); "
                f"it belongs to base model {delta.metadata.get('base_model')!r}. Load that base, or pass "
                "check_base=False to apply it anyway."
            )
        saved[name] = (idx, old)
    for name, values in delta.dense.items():
        p = params.get(name)
        if p is None or p.shape != values.shape or p.dtype != values.dtype:
            got = None if p is None else f"{tuple(p.shape)} {p.dtype}"
            raise DeltaError(
                f"delta tensor {name!r} (trained whole, {tuple(values.shape)} {values.dtype}) does not fit this "
                f"model (model: {got}): was it made for another base?"
            )
        saved_dense[name] = p.detach().clone()  # replaced whole: whatever the base held does not matter
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
