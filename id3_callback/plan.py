"""The plan: which entries are selectable, the budget, and every mode of a run, decided once with reasons.

`resolve_plan` is a pure function of the model's parameters, the config, the method and the training loop's
settings (`TrainingSettings`, which `ID3Trainer` fills from `TrainingArguments`). Its result is frozen: the
engine installs what it says at `start` and never changes a mode afterwards. A mode the config asks for
explicitly that cannot apply is turned off with a warning naming each blocker; the summary line repeats them.

Example:
    >>> plan = resolve_plan(model, ID3Config(budget=100, low_memory=True), method,
    ...                     TrainingSettings(accumulation_steps=4))        # doctest: +SKIP
    >>> plan.low_memory, plan.low_memory_blockers[0][:29]                 # doctest: +SKIP
    (False, 'gradient_accumulation_steps=4')
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import native, selection
from .bounded import GROUPS, bounded_layers
from .bounded_tied import tied_output_heads
from .config import ID3Config
from .sparse_grads import row_sparse_candidates, tied_output_candidates

if TYPE_CHECKING:
    from .methods.base import SelectionMethod

TORCH_CLIPPING = (
    "max_grad_norm > 0 with a transformers version whose Trainer clips inline with torch's clip_grad_norm_, "
    "which reads only dense p.grad (upgrade transformers, or set max_grad_norm=0)"
)
#: () -> iterable of (loss with its graph, samples in the batch): data for methods that calibrate before
#: training ('fish'); see `ID3Engine.start`.
CalibrationBatches = Callable[[], Iterable[tuple[torch.Tensor, int]]]


@dataclass(frozen=True)
class TrainingSettings:
    """What the training loop does around `engine.step()`: the facts a mode decision depends on.

    `grads_through_engine`: the loop reads gradients only through the engine (`clip_grad_norm_`,
    `grad_norm`), as `ID3Trainer` does; row-sparse embedding gradients are then on by default.
    `torch_clipping`: the loop clips with `torch.nn.utils.clip_grad_norm_`, which reads only dense `p.grad`.
    `calibration_batches`: training data for methods that look at it before training ('fish').

    Example:
        >>> TrainingSettings(accumulation_steps=2, loss_scaling=True).accumulation_steps
        2
    """

    accumulation_steps: int = 1
    loss_scaling: bool = False
    torch_clipping: bool = False
    grads_through_engine: bool = False
    compiled: bool = False  # the loop runs the model under torch.compile
    calibration_batches: CalibrationBatches | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Plan:
    """Everything decided before training; the engine reads it, nothing writes it.

    `*_blockers` name why a mode is off (empty when nothing blocks it, or when it was not asked for).
    """

    selectable: Mapping[str, nn.Parameter]
    dense: Mapping[str, nn.Parameter]
    offsets: Mapping[str, int]  # each selectable tensor's first global flat index
    selectable_entries: int
    dense_entries: int
    budget: int  # selectable entries to unmask over the run
    settings: TrainingSettings
    distributed: bool
    low_memory: bool
    low_memory_blockers: tuple[str, ...]
    sparse_grads: bool
    sparse_grad_blockers: tuple[str, ...]
    row_sparse_tables: Mapping[str, nn.Embedding]  # made row-sparse when `sparse_grads`
    tied_tables: Mapping[str, tuple]  # streamed in blocks when `sparse_grads` and `low_memory`
    recompute: bool
    row_sparse_scoring: frozenset[str]  # embedding weights whose gradient rows are checked for zeros
    # weight_grads='bounded': weight name -> (module, kind) whose dense gradient backward never builds
    bounded_layers: Mapping[str, tuple] = field(default_factory=lambda: MappingProxyType({}))
    bounded_blockers: tuple[str, ...] = ()
    # native.status() when bounded layers run: native kernels or torch code, and why
    bounded_kernels: str = ""
    # bounded layers whose weight is also an input embedding table -> those nn.Embedding modules
    bounded_tied: Mapping[str, tuple] = field(default_factory=lambda: MappingProxyType({}))
    bounded_skipped: tuple[str, ...] = ()  # large Linear-like weights left dense while others are bounded

    def reasons(self) -> list[str]:
        """Summary lines for modes the config asked for that the plan turned off."""
        lines = []
        if self.low_memory_blockers:
            lines.append(f"  low-memory mode off: {'; '.join(self.low_memory_blockers)}")
        if self.sparse_grad_blockers:
            lines.append(f"  row-sparse embedding gradients off: {'; '.join(self.sparse_grad_blockers)}")
        if self.bounded_blockers:
            lines.append(f"  bounded weight gradients off: {'; '.join(self.bounded_blockers)}")
        if self.bounded_skipped:
            lines.append(f"  bounded weight gradients off for: {'; '.join(self.bounded_skipped)}")
        return lines

    def bounded_lines(self, branches: str) -> list[str]:
        """Summary lines naming the layers the bounded path runs, how each layer's branch is chosen
        (`branches`: `BranchCosts.summary()`), and how the tied ones are completed."""
        if not self.bounded_layers:
            return []
        entries = sum(module.weight.numel() for module, _ in self.bounded_layers.values())
        lines = [
            f"  bounded weight gradients (no dense dW): {len(self.bounded_layers)} layers, {entries:,} entries; "
            f"per layer and step, GEMM rows over the live tokens (every entry scored) or the bound over "
            f"{GROUPS} token groups and exact products where it reaches the cut; {branches}; "
            f"{self.bounded_kernels}"
        ]
        for name, embeddings in self.bounded_tied.items():
            lines.append(
                f"  bounded tied output layer {name} (also {len(embeddings)} input embedding"
                f"{'s' * (len(embeddings) != 1)}): the rows of the step's input tokens are scored whole at "
                "step() with both gradients, every other row by the bound on the output layer's gradient"
            )
        return lines


# The resolved ID3Config.optimizer: "trainer" also when optimizer="auto" honoured TrainingArguments.optim.
NOT_SPARSE_ADAMW = (
    "the optimizer is not SparseAdamW (ID3Config.optimizer='trainer', or 'auto' honouring TrainingArguments.optim "
    "or an optimizer passed to the Trainer): a standard optimizer reads dense gradients"
)


def _match(pattern: str | None, name: str) -> bool:
    return pattern is not None and re.search(pattern, name) is not None


def split_parameters(
    model: nn.Module, config: ID3Config
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(selectable, dense) trainable parameters by name, per include / exclude / dense."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(
            "the model has no trainable parameters: ID3 selects among parameters with requires_grad=True. "
            "Call model.requires_grad_(True) (or unfreeze the layers to fine-tune) before building the trainer."
        )
    for label, pattern in (("include", config.include), ("exclude", config.exclude), ("dense", config.dense)):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{label}={pattern!r} is not a valid regex: {err}") from None
    dense = {n: p for n, p in trainable.items() if _match(config.dense, n)}
    selectable = {
        n: p
        for n, p in trainable.items()
        if n not in dense
        and (config.include is None or _match(config.include, n))
        and not _match(config.exclude, n)
    }
    if config.dense is not None and not dense:
        raise ValueError(
            f"dense={config.dense!r} matches no trainable parameter. Some names: {list(trainable)[:6]}"
        )
    if not selectable:
        raise ValueError(
            f"include={config.include!r} / exclude={config.exclude!r} leave no selectable parameter. "
            f"Trainable names look like: {list(trainable)[:6]}. Adjust the regexes (they use re.search)."
        )
    return selectable, dense


def resolve_budget(config: ID3Config, method: SelectionMethod, selectable: int, dense: int) -> int:
    """The number of selectable entries to unmask over the run.

    The configured budget counts selectable entries, plus the dense ones with `dense_in_budget`. A method
    whose set size is not a choice (`budget_override`: bitfit, full) trains its own count instead; it warns
    when that total differs from the configured budget, and no dense-entry check applies to a budget unused.
    """
    configured = config.resolve_budget(selectable)
    inside = dense if config.dense_in_budget else 0
    override = method.budget_override()
    if override is not None:
        count, what = override
        if count + inside != configured:
            plus = f" + {inside:,} dense entries counted in the budget" if inside else ""
            warnings.warn(
                f"method {config.method!r} trains {what}: {count:,} entries{plus}, not the configured budget of "
                f"{configured:,}; the budget is set to {count:,}.",
                stacklevel=4,
            )
        return count
    if config.dense_in_budget and dense >= configured:
        raise ValueError(
            f"dense parameters hold {dense:,} entries, all of the budget {configured:,}: "
            "raise the budget or set dense_in_budget=False."
        )
    return configured - inside


def low_memory_blockers(config: ID3Config, method: SelectionMethod, settings: TrainingSettings) -> list[str]:
    """Why the low-memory mode cannot run under these settings (empty list: it can).

    Clipping by the global norm is fine as long as it goes through `clip_grad_norm_` (ID3Trainer's does).
    """
    reasons = []
    if settings.accumulation_steps > 1:
        reasons.append(
            f"gradient_accumulation_steps={settings.accumulation_steps} (it scores each gradient as backward "
            "completes it, so it needs the whole step's gradient in one backward)"
        )
    if settings.loss_scaling:
        reasons.append("fp16 loss scaling (the scaler unscales p.grad, which this mode frees; use bf16)")
    if settings.torch_clipping:
        reasons.append(TORCH_CLIPPING)
    if config.optimizer != "sparse_adamw":
        reasons.append(NOT_SPARSE_ADAMW)
    if method.score_fn() is None:
        reasons.append(f"method={config.method!r} (only methods that grow the set by a score, e.g. 'id3')")
    return reasons


def sparse_grad_blockers(
    config: ID3Config, method: SelectionMethod, settings: TrainingSettings, distributed: bool
) -> list[str]:
    """Why row-sparse embedding gradients cannot be used under these settings (empty list: they can)."""
    reasons = []
    if config.optimizer != "sparse_adamw":
        reasons.append(NOT_SPARSE_ADAMW)
    if not method.sparse_grads:
        reasons.append(f"method={config.method!r} (it reads dense gradients)")
    if settings.loss_scaling:
        reasons.append("fp16 loss scaling (the scaler's unscale and norm passes read dense gradients)")
    if distributed:
        reasons.append("DDP (its gradient all-reduce expects the dense layout)")
    if settings.torch_clipping:
        reasons.append(TORCH_CLIPPING)
    return reasons


def bounded_blockers(
    config: ID3Config,
    method: SelectionMethod,
    settings: TrainingSettings,
    distributed: bool,
    low_memory: bool,
) -> list[str]:
    """Why bounded weight gradients cannot run under these settings (empty list: they can)."""
    reasons = []
    if config.method != "id3":
        reasons.append(f"method={config.method!r} (it scores by the D3 bound: 'id3' only)")
    if config.optimizer != "sparse_adamw":
        reasons.append(NOT_SPARSE_ADAMW)
    if settings.accumulation_steps > 1:
        reasons.append(
            f"gradient_accumulation_steps={settings.accumulation_steps} (this version bounds one backward's "
            "gradient; bounds over micro-batches add, a later version can follow)"
        )
    if settings.loss_scaling:
        reasons.append("fp16 loss scaling (the scaler unscales p.grad, which this path never builds)")
    if settings.torch_clipping:
        reasons.append(TORCH_CLIPPING)
    if distributed:
        reasons.append(
            "DDP (its all-reduce expects dense gradients; ranks could all-reduce candidates later)"
        )
    if low_memory:
        reasons.append("low_memory=True (not combined yet)")
    return reasons


def auto_blockers(selectable: Mapping[str, nn.Parameter], settings: TrainingSettings) -> list[str]:
    """Why `weight_grads='auto'` keeps dense weight gradients where 'bounded' could run (empty: it takes the
    bounded path). It is exact either way; 'auto' takes it where it is the faster one and nothing it cannot
    see could break it."""
    reasons = []
    if not settings.grads_through_engine:
        reasons.append(
            "weight_grads='auto' outside ID3Trainer (a plain loop may accumulate gradients or clip with torch, "
            "which this path cannot see; weight_grads='bounded' opts in)"
        )
    if settings.compiled:
        reasons.append(
            "weight_grads='auto' under torch.compile (the replaced forwards would break its graphs)"
        )
    devices = sorted({p.device.type for p in selectable.values()} - {"cpu"})
    if devices:
        reasons.append(
            f"weight_grads='auto' with weights on {', '.join(devices)} (its kernels are CPU code; the dense "
            "GEMM is the fast path there)"
        )
    elif native.library(warn=False) is None:
        reasons.append(
            f"weight_grads='auto' without the native kernels ({native.status()}; the torch code is no faster "
            "than the dense path)"
        )
    return reasons


def resolve_plan(
    model: nn.Module,
    config: ID3Config,
    method: SelectionMethod,
    selectable: dict[str, nn.Parameter],
    dense: dict[str, nn.Parameter],
    settings: TrainingSettings,
    distributed: bool,
) -> Plan:
    """Decide every mode once.

    Low-memory mode (`config.low_memory`) falls back with a warning when a blocker applies. Row-sparse
    embedding gradients: an explicit True or False is honoured where possible (True that cannot apply warns);
    None means on under the Trainer (`settings.grads_through_engine`) and in low-memory mode, where the
    hooks free `p.grad` in backward so the loop never sees the layout. Pointwise recomputation: None means
    on exactly in low-memory mode and on the bounded path (with no dense gradient left, the saved
    activations are what stands between it and LoRA's peak).
    """
    selectable_entries = sum(p.numel() for p in selectable.values())
    dense_entries = sum(p.numel() for p in dense.values())
    offsets, running = {}, 0
    for name, p in selectable.items():
        offsets[name], running = running, running + p.numel()
    budget = resolve_budget(config, method, selectable_entries, dense_entries)

    low_memory, lm_blockers = bool(config.low_memory), ()
    if low_memory:
        lm_blockers = tuple(low_memory_blockers(config, method, settings))
        if lm_blockers:
            low_memory = False
            warnings.warn(
                f"ID3Config(low_memory=True) cannot apply with {'; '.join(lm_blockers)}. Falling back to the "
                "standard mode: the same selection, but dense gradients are kept until the optimizer step.",
                stacklevel=3,
            )

    wanted = config.sparse_embedding_grads
    wanted = (settings.grads_through_engine or low_memory) if wanted is None else wanted
    sparse_grads, sg_blockers = _sparse_grads(config, method, settings, distributed, bool(wanted))

    bounded, b_blockers, bounded_tied, skipped = {}, (), {}, []
    wants_bounded = config.weight_grads == "bounded" or (
        config.weight_grads == "auto" and config.method == "id3"
    )
    if wants_bounded:
        b_blockers = tuple(bounded_blockers(config, method, settings, distributed, low_memory))
        if not b_blockers and config.weight_grads == "auto":
            b_blockers = tuple(auto_blockers(selectable, settings))
        if not b_blockers:
            tied = tied_output_candidates(model, selectable, selection.BOUNDED_MIN_ENTRIES)
            bounded, skipped = bounded_layers(model, selectable, tied_output_heads(tied))
            bounded_tied = {name: tied[name][0] for name in tied if name in bounded}
            if not bounded:
                b_blockers = (
                    "no selectable float32 nn.Linear / Conv1D weight of at least "
                    f"{selection.BOUNDED_MIN_ENTRIES:,} entries"
                    + (f" ({'; '.join(skipped)})" if skipped else ""),
                )
        if b_blockers:
            bounded, bounded_tied, skipped = {}, {}, []
        if b_blockers and config.weight_grads == "bounded":  # 'auto' just keeps dense: the plan says why
            warnings.warn(
                f"ID3Config(weight_grads='bounded') cannot apply with {'; '.join(b_blockers)}: selectable "
                "weights get dense gradients (the same selection, a slower backward).",
                stacklevel=3,
            )

    recompute = config.recompute_pointwise
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return Plan(
        selectable=MappingProxyType(dict(selectable)),
        dense=MappingProxyType(dict(dense)),
        offsets=MappingProxyType(offsets),
        selectable_entries=selectable_entries,
        dense_entries=dense_entries,
        budget=budget,
        settings=settings,
        distributed=distributed,
        low_memory=low_memory,
        low_memory_blockers=lm_blockers,
        sparse_grads=sparse_grads,
        sparse_grad_blockers=sg_blockers,
        row_sparse_tables=MappingProxyType(
            row_sparse_candidates(model, selectable, selection.ROW_SPARSE_MIN_ENTRIES)
        ),
        tied_tables=MappingProxyType(
            tied_output_candidates(model, selectable, selection.ROW_SPARSE_MIN_ENTRIES)
        ),
        # None: on wherever the plan aims at LoRA's memory (low-memory mode, bounded weight gradients)
        recompute=(low_memory or bool(bounded)) if recompute is None else bool(recompute),
        row_sparse_scoring=frozenset(
            n
            for n, p in selectable.items()
            if id(p) in embeddings and p.numel() >= selection.ROW_SPARSE_MIN_ENTRIES
        ),
        bounded_layers=MappingProxyType(bounded),
        bounded_blockers=b_blockers,
        bounded_kernels=native.status() if bounded else "",
        bounded_tied=MappingProxyType(bounded_tied),
        bounded_skipped=tuple(skipped),
    )


def _sparse_grads(
    config: ID3Config, method: SelectionMethod, settings: TrainingSettings, distributed: bool, wanted: bool
) -> tuple[bool, tuple[str, ...]]:
    """(on, the blockers to report): an explicit True that cannot apply warns; reasons are kept only for it."""
    blockers = tuple(sparse_grad_blockers(config, method, settings, distributed)) if wanted else ()
    if blockers and config.sparse_embedding_grads:
        warnings.warn(
            f"ID3Config(sparse_embedding_grads=True) cannot apply with {'; '.join(blockers)}. Embedding "
            "gradients stay dense (the same selection, a slower backward).",
            stacklevel=4,
        )
    return wanted and not blockers, blockers if config.sparse_embedding_grads else ()


def with_process_group(plan: Plan, config: ID3Config, method: SelectionMethod) -> Plan:
    """`plan` for a process group that appeared after it was made (a plain loop may build the engine before
    `init_process_group`; `start` checks): the layout decision again, everything else as it was."""
    if plan.distributed:
        return plan
    sparse_grads, blockers = _sparse_grads(config, method, plan.settings, True, plan.sparse_grads)
    bounded = {}
    if plan.bounded_layers:
        bounded = {
            "bounded_layers": MappingProxyType({}),
            "bounded_blockers": ("DDP (process group found at start)",),
            "bounded_tied": MappingProxyType({}),
            "bounded_skipped": (),
            "bounded_kernels": "",
        }
        if config.recompute_pointwise is None and not plan.low_memory:
            bounded["recompute"] = False  # it was on only for the bounded path, which DDP turns off
        if config.weight_grads == "bounded":
            warnings.warn(
                "ID3Config(weight_grads='bounded') cannot apply under DDP: dense gradients.", stacklevel=3
            )
    return dataclasses.replace(
        plan, distributed=True, sparse_grads=sparse_grads, sparse_grad_blockers=blockers, **bounded
    )
