"""The engine's checkpoint state on disk: written durably, verified before anything is loaded.

`id3_state.pt` is `MAGIC`, the SHA-256 of the payload in hex, a newline, then the payload (`torch.save` of
the engine's state dict). The payload carries the global step it was saved at and a fingerprint of
everything that defines the selection (method, budget, scheduler, eps, exp, include/exclude/dense, the
optimizer kind, total steps, the selectable tensors' names and shapes), so a damaged file, a state from
another step or another run, or a resume with other settings is refused with one `StateError` that names
the file, what differs and what to do.

A checkpoint folder is *complete* once the Trainer has written `trainer_state.json`: ID3Trainer writes the
ID3 state before the Trainer writes anything (and removes a stale `trainer_state.json` first), so a save
interrupted at any point leaves a folder without one, and the Trainer rotates older checkpoints away only
after it.

Example:
    >>> folder = resumable_checkpoint("out")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re

import torch

from .io import atomic_write

STATE_FILE = "id3_state.pt"
TRAINER_STATE = (
    "trainer_state.json"  # transformers' TRAINER_STATE_NAME, kept here so the engine needs no import
)
FORMAT = "id3-engine-state/2"
LEGACY_FORMAT = "id3-engine-state/1"  # no checksum, step or fingerprint: read with the checks it allows
MAGIC = b"ID3STATE\n"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_FIX = (
    "Resume with the same ID3Config and max_steps this checkpoint was trained with, or start a new run "
    "(another output_dir)."
)


class StateError(ValueError):
    """An ID3 checkpoint state that is missing, damaged, or does not belong to this run. Nothing was loaded."""


# ------------------------------------------------------------------------------------------------- writing
def fingerprint(engine, total_steps: int | None) -> dict:
    """Everything that defines which entries get selected, as plain values (compared key by key on load)."""
    config = engine.config
    tensors = hashlib.sha256()
    for name, p in [*engine.unmasked.params.items(), *engine.unmasked.dense.items()]:
        tensors.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    out = {
        "method": config.method,
        "budget": int(engine.budget),
        "scheduler": config.scheduler,
        "eps": float(config.eps),
        "exp": float(config.exp),
        "include": config.include,
        "exclude": config.exclude,
        "dense": config.dense,
        "dense_in_budget": bool(config.dense_in_budget),
        "optimizer": config.optimizer,
        "total_steps": None if total_steps is None else int(total_steps),
        "tensors": tensors.hexdigest(),
    }
    if config.method == "random":
        out["mask_seed"] = int(engine.seed)
    if config.method == "fish":
        out["fisher_samples"] = int(config.fisher_samples)
    return out


def encode(state: dict) -> bytes:
    """The file's bytes for a state dict: magic, payload checksum, payload."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def write_durably(path: str | os.PathLike, data: bytes) -> str:
    """Atomically replace `path` with `data`, fsyncing the file and its folder (survives a power cut)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    path = atomic_write(path, write)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return path


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def begin_checkpoint(folder: str | os.PathLike) -> None:
    """Make `folder` read as incomplete until the Trainer finishes it: drop a `trainer_state.json` left there
    by an earlier run, so a save interrupted midway never looks complete beside stale files."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    stale = os.path.join(folder, TRAINER_STATE)
    if os.path.lexists(stale):
        os.remove(stale)
        fsync_dir(folder)


# ------------------------------------------------------------------------------------------------- reading
def read_state(path: str | os.PathLike) -> dict:
    """Read and checksum `path` (one read of the whole file); raises `StateError` for anything unreadable."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise StateError(f"{path} not found: this checkpoint has no ID3 state.") from None
    except OSError as err:
        raise StateError(f"{path} cannot be read ({err}).") from None
    damaged = f"{path} is damaged ({{}}): resume from an earlier checkpoint."
    if data.startswith(MAGIC):
        head, sep, payload = data[len(MAGIC) :].partition(b"\n")
        if not sep or len(head) != 64:
            raise StateError(damaged.format(f"truncated header, {len(data)} bytes"))
        if hashlib.sha256(payload).hexdigest().encode() != head:
            raise StateError(damaged.format("payload checksum mismatch: truncated or altered"))
    elif data.startswith(b"PK"):  # a plain torch.save zip: the legacy format, verified by what it holds
        payload = data
    else:
        raise StateError(damaged.format(f"not an ID3 state file, {len(data)} bytes"))
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged archives
        raise StateError(damaged.format(f"unreadable payload: {type(err).__name__}")) from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise StateError(
            f"{path} is not an ID3 engine state (format tag missing): was it written by id3_callback?"
        )
    return state


def read_global_step(folder: str | os.PathLike) -> int | None:
    """The global step in the checkpoint's `trainer_state.json`, or None if it is missing or unreadable."""
    try:
        with open(os.path.join(folder, TRAINER_STATE)) as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify(
    state: dict, engine, path: str, global_step: int | None = None, total_steps: int | None = None
) -> None:
    """Refuse (`StateError`) a state that does not belong to `engine`'s run, or is internally inconsistent.

    `global_step`: the step of the checkpoint's `trainer_state.json`; `total_steps`: this run's T, when known.
    """
    if state["format"] == FORMAT:
        saved = state["fingerprint"]
        here = fingerprint(engine, total_steps)
        if total_steps is None or saved.get("total_steps") is None:
            saved, here = dict(saved, total_steps=None), dict(here, total_steps=None)
        diffs = [
            "the selectable or dense tensors (names, shapes or dtypes)"
            if key == "tensors"
            else f"{key}: checkpoint {saved.get(key)!r}, this run {here.get(key)!r}"
            for key in here
            if saved.get(key) != here.get(key)
        ]
        if diffs:
            raise StateError(f"{path} was saved by a run with other settings ({'; '.join(diffs)}). {_FIX}")
        if global_step is not None and state["global_step"] != global_step:
            raise StateError(
                f"{path} holds the ID3 state of step {state['global_step']}, but the checkpoint's {TRAINER_STATE} is "
                f"at step {global_step}: the files come from different saves (a stale {STATE_FILE}?). Resume "
                "from another checkpoint."
            )
    else:  # legacy: only what it recorded
        method, budget = state["config"]["method"], state["budget"]
        if budget != engine.budget or method != engine.config.method:
            raise StateError(
                f"{path} was saved by a run with other settings (method {method!r}, budget {budget:,}; this run: "
                f"{engine.config.method!r}, {engine.budget:,}). Resume with the same ID3Config, or start a new run."
            )
    _verify_set(state, engine, path)


def _verify_set(state: dict, engine, path: str) -> None:
    """Indices in range, unique and within the budget; base values that match them."""
    problem = _set_problem(state, engine)
    if problem:
        raise StateError(f"{path} is inconsistent ({problem}): resume from an earlier checkpoint.")


def _set_problem(state: dict, engine) -> str | None:
    unmasked, params = state["unmasked"], engine.unmasked.params
    if set(unmasked["indices"]) != set(params):
        odd = sorted(set(params) ^ set(unmasked["indices"]))[:5]
        return f"its unmasked set covers other tensors than this run's selectable ones, e.g. {odd}"
    total = 0
    for name, idx in unmasked["indices"].items():
        p, base = params[name], unmasked["base_values"].get(name)
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.long:
            return f"{name}: indices are not a 1-D int64 tensor"
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
            return f"{name}: index out of range for {p.numel():,} entries"
        if torch.unique(idx).numel() != idx.numel():
            return f"{name}: duplicate indices"
        if base is None or base.shape != idx.shape or base.dtype != p.dtype:
            return f"{name}: base values do not match its indices"
        total += idx.numel()
    for name in unmasked.get("full", {}):
        if name not in params or unmasked["indices"][name].numel():
            return f"{name}: marked as unmasked whole but has indices"
        total += params[name].numel()
    if total > engine.budget:
        return f"{total:,} unmasked entries, above the budget {engine.budget:,}"
    dense = engine.unmasked.dense
    if set(unmasked["dense_base"]) != set(dense) or any(
        unmasked["dense_base"][n].shape != p.shape for n, p in dense.items()
    ):
        return "its dense tensors differ from this run's"
    return None


def load_verified(
    folder: str | os.PathLike, engine, global_step: int | None = None, total_steps: int | None = None
) -> dict:
    """Read `folder`'s ID3 state and verify it against `engine` (see `verify`); returns the state dict."""
    path = os.path.join(os.fspath(folder), STATE_FILE)
    state = read_state(path)
    verify(state, engine, path, global_step, total_steps)
    return state


# ------------------------------------------------------------------------------------------ checkpoint folders
def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete ID3 checkpoint (None: it is). Checks files, checksum and step."""
    folder = os.fspath(folder)
    step = read_global_step(folder)
    if step is None:
        if os.path.exists(os.path.join(folder, TRAINER_STATE)):
            return f"its {TRAINER_STATE} is unreadable"
        return f"no {TRAINER_STATE}"
    path = os.path.join(folder, STATE_FILE)
    if not os.path.exists(path):
        return f"no {STATE_FILE} (or it was saved without ID3Trainer)"
    try:
        state = read_state(path)
    except StateError as err:
        return str(err)
    if state["format"] == FORMAT and state["global_step"] != step:
        return f"{STATE_FILE} is of step {state['global_step']}, {TRAINER_STATE} of step {step}"
    return None


def checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """`checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    output_dir = os.fspath(output_dir)
    try:
        names = os.listdir(output_dir)
    except OSError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := _CHECKPOINT.match(n))]
    found = [(step, n) for step, n in found if os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found, reverse=True)]


def resumable_checkpoint(output_dir: str | os.PathLike, before: int | None = None) -> str | None:
    """The newest complete checkpoint of `output_dir` (below step `before`, if given), or None."""
    for folder in checkpoints(output_dir):
        step = int(_CHECKPOINT.match(os.path.basename(folder)).group(1))
        if (before is None or step < before) and incomplete_reason(folder) is None:
            return folder
    return None


def refuse_incomplete(folder: str | os.PathLike, reason: str) -> StateError:
    """The error for resuming from an incomplete `folder`, naming the newest complete one before it."""
    folder = os.path.normpath(os.fspath(folder))
    match = _CHECKPOINT.match(os.path.basename(folder))
    previous = resumable_checkpoint(os.path.dirname(folder), int(match.group(1))) if match else None
    advice = (
        f"Resume from {previous}, the newest complete checkpoint before it"
        if previous
        else "No complete checkpoint precedes it: train from the start"
    )
    return StateError(f"{folder} is an incomplete checkpoint (interrupted save?): {reason}. {advice}.")
