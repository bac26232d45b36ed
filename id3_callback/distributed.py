"""Multi-process training (DDP): rank helpers, the cross-rank consistency check, unsupported setups.

Under DDP every rank holds a full replica and `backward` of the synchronised micro-batch all-reduces the
gradients before `ID3Trainer.training_step` calls `engine.step()`. Every rank therefore scores the same
averaged gradients against the same weights and, selection being deterministic, grows the same unmasked
set with no extra communication. `check_consistency` verifies that cheaply: each rank hashes its state
into four integers and one `all_gather` compares them.

Example (a custom loop under `torchrun`; the Trainer glue calls it for you):
    >>> check_consistency(engine, "step 100")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import zlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from . import selection

if TYPE_CHECKING:
    from .config import ID3Config
    from .engine import ID3Engine

logger = logging.getLogger("id3_callback")

# Modular hashing with a prime below 2**31 keeps every product below 2**62: exact int64 arithmetic on any
# device, so ranks agree bit for bit whatever their reduction order.
_P = 2_147_483_629
_A, _B, _C = 1_103_515_245, 972_663_749, 1_597_334_677
_M = (1 << 61) - 1
_FIELDS = ("optimizer steps", "unmasked entries", "unmasked-set hash", "trained-values hash")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def _mix(index: torch.Tensor, salt: int, size: int) -> torch.Tensor:
    """A well-spread value in [0, P) for each flat index (< `size`) of a tensor."""
    if size <= 1 << 32:  # index * A < 2**63
        h = (index * _A + salt) % _P
    else:
        h = ((index % _P) * _A % _P + (index // _P) % _P * _B % _P + salt) % _P
    return (h ^ (h >> 16)) * _C % _P


def _bits(values: torch.Tensor) -> torch.Tensor:
    """The raw bits of floating-point `values` as int64, so equal hashes mean bitwise-equal values."""
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    return values.contiguous().view(int_type).long()


def _entry_hashes(index: torch.Tensor, values: torch.Tensor, salt: int, size: int) -> torch.Tensor:
    """[set, value] hash sums of entries `index` holding `values`; each sum < 2**31 * n fits int64."""
    at = _mix(index, salt, size)
    # A value change d moves its term by at * d (mod P): nonzero unless at or d is a multiple of the prime P.
    return torch.stack([at.sum(), (at * (_bits(values) % _P + 1) % _P).sum()])


@torch.no_grad()
def state_digest(engine: ID3Engine) -> torch.Tensor:
    """int64[4]: optimizer steps, unmasked count, a hash of the set, a hash of the trainable values.

    Both hashes are sums of per-entry hashes, so they ignore insertion order and cost O(B + dense entries)
    on the parameters' device, with no sort, no host copy of the indices and one device sync.

    Example:
        >>> state_digest(engine).tolist()  # doctest: +SKIP
        [100, 38612, 731942211837, 402209917360]
    """
    unmasked = engine.unmasked
    whole = set(getattr(unmasked, "full", {}))  # tensors unmasked whole (method 'full'): no index list
    device = next(iter(unmasked.params.values())).device
    sums = torch.zeros(2, dtype=torch.long, device=device)  # kept below 2**61 so nothing overflows
    for name, p in [*unmasked.params.items(), *unmasked.dense.items()]:
        salt = zlib.crc32(name.encode()) % _P
        flat = p.detach().reshape(-1)
        if name in unmasked.params and name not in whole:
            idx = unmasked.indices[name]
            if idx.numel():
                sums = (sums + _entry_hashes(idx, flat[idx], salt, flat.numel()).to(device)) % _M
            continue
        for start in range(
            0, flat.numel(), selection.CHUNK
        ):  # trained whole: chunked, an embedding can be large
            stop = min(start + selection.CHUNK, flat.numel())
            index = torch.arange(start, stop, device=flat.device)
            sums = (sums + _entry_hashes(index, flat[start:stop], salt, flat.numel()).to(device)) % _M
    counts = torch.tensor([engine.steps_done, len(unmasked)], dtype=torch.long)
    return torch.cat([counts, sums.cpu()])


def _comm_device(engine: ID3Engine) -> torch.device:
    # gloo (and mpi) reduce CPU tensors; nccl and friends need tensors on the device the model lives on.
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    return next(iter(engine.unmasked.params.values())).device


def check_consistency(engine: ID3Engine, where: str = "") -> None:
    """Raise `RuntimeError` if the ranks' ID3 states differ (no-op outside a multi-rank process group).

    A collective: every rank must call it at the same point. The Trainer glue calls it every
    `ID3Config.consistency_check_steps` optimizer steps, at each checkpoint save and resume, at the end of
    training, and in `save_delta`.
    """
    if not is_distributed():
        return
    digest = state_digest(engine).to(_comm_device(engine))
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    table = torch.stack(gathered).cpu()
    bad = [r for r in range(len(table)) if not torch.equal(table[r], table[0])]
    if not bad:
        return
    lines = []
    for r in bad:
        fields = [
            f"{_FIELDS[i]} {int(table[r, i])} vs {int(table[0, i])}"
            for i in range(4)
            if table[r, i] != table[0, i]
        ]
        lines.append(f"  rank {r} differs from rank 0 in: " + "; ".join(fields))
    raise RuntimeError(
        f"ID3 state diverged across ranks{' at ' + where if where else ''} "
        f"(rank {get_rank()} of {get_world_size()} reporting):\n" + "\n".join(lines) + "\n"
        "Every rank must score the same all-reduced gradients against the same weights, so that the "
        "deterministic selection agrees without communication. Check that:\n"
        "  - every rank runs the same model, ID3Config, TrainingArguments.seed and mask_seed;\n"
        "  - the model is wrapped in DistributedDataParallel (the Trainer does it under torchrun / accelerate "
        "launch) and, in a custom loop, engine.step() runs after backward of the synchronised micro-batch, "
        "never inside no_sync();\n"
        "  - no rank-specific code edits engine.unmasked, the weights or the optimizer (e.g. under `if rank == "
        "...`), and every rank resumed from the same checkpoint (id3_state.pt on a shared filesystem).\n"
        "Different data shards, data order and dropout masks per rank are fine: gradients are averaged "
        "before selection. A trained-values mismatch with equal sets means the optimizer updated the ranks "
        "differently (a non-DDP optimizer step, or mixed hardware)."
    )


def check_distributed_support(trainer, config: ID3Config) -> None:
    """Refuse, before training, the parallel setups ID3 cannot run correctly (called by `ID3Trainer`).

    DeepSpeed is refused separately (`ID3TrainerMixin.__init__`). Supported: one process, and DDP
    (torchrun / accelerate launch) with either optimizer. See docs/distributed.md.

    Example:
        >>> check_distributed_support(trainer, ID3Config(low_memory=True))  # doctest: +SKIP
        ValueError: low_memory=True does not work with 2 processes (DDP): ...
    """
    model = trainer.model
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(
        trainer, "is_distributed_loading_by_transformers", False
    )
    if not sharded and model is not None:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor

        sharded = any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()) or any(
            isinstance(p, DTensor) for p in model.parameters()
        )
    if sharded:
        raise ValueError(
            "ID3 does not support FSDP or tensor parallelism: they split each parameter and its gradient "
            "across ranks (FSDP2 and tensor parallelism turn parameters into DTensor shards, FSDP1 with "
            "use_orig_params=True into flat 1-D slices, some of them empty), so the unmasked set's "
            "per-tensor indices, base values and gradient masking would address local shards, not the "
            "tensors. Train with DDP instead: drop `fsdp`/`fsdp_config` from TrainingArguments (or launch "
            "with `accelerate launch` without --use_fsdp) and do not load the model with tp_plan/"
            "distributed_config. DDP keeps ID3's optimizer state at O(budget) per rank. See docs/distributed.md."
        )
    if getattr(trainer.args, "fsdp", None) and is_distributed():
        # accelerate only builds FSDP on GPU-like devices; on CPU it silently trains with plain DDP.
        logger.warning(
            "TrainingArguments.fsdp is set but accelerate did not enable FSDP (it needs GPUs): the run uses "
            "DDP, which ID3 supports."
        )
    world = max(get_world_size(), int(getattr(trainer.args, "world_size", 1) or 1))
    if world > 1 and config.low_memory:
        raise ValueError(
            f"low_memory=True does not work with {world} processes (DDP): it scores each gradient in a "
            "post-accumulate-grad hook, which fires on the rank's own gradient before DDP's all-reduce has "
            "averaged it, so ranks would select different entries. Set ID3Config(low_memory=False) for "
            "multi-process training (ID3's optimizer state is O(budget) either way)."
        )
