"""`ID3Engine`: owns the budget and the unmasked set and grows it each step. No Trainer imports: any loop.

engine = ID3Engine(model, ID3Config(budget=10_000))
engine.start(total_steps=1000)
opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-4)
for batch in loader:
    model(**batch).loss.backward()
    engine.step()          # score, grow the set, zero masked gradients
    opt.step(); opt.zero_grad()

A step, top to bottom (docs/architecture.md has the picture): the plan (`plan.py`, decided at construction)
says which modes run; backward has filled `p.grad` (or, in low-memory mode, the hooks of `low_memory.py`
have scored each gradient as it came); the method scores through the scan (`scan.py`) and returns a
`Selection`; the engine applies it to the set and masks the gradients; the optimizer reads the set.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import replace

import torch
from torch import nn

from . import state as state_io
from .bounded import BoundedGrads
from .bounded_costs import BranchCosts
from .bounded_tied import TiedOutputRows
from .config import ID3Config
from .distributed import is_distributed
from .io import atomic_write
from .low_memory import LowMemoryMode
from .masks import UnmaskedSet
from .methods import get_method
from .methods.base import Selection, StepContext
from .plan import (
    CalibrationBatches,
    Plan,
    TrainingSettings,
    resolve_plan,
    split_parameters,
    with_process_group,
)
from .recompute import PointwiseRecompute
from .scan import Scan
from .schedulers import Schedule
from .selection import selection_threads
from .sparse_grads import RowSparseEmbeddings, as_coalesced, gather_entries

__all__ = ["ID3Engine", "STATE_FILE", "atomic_torch_save", "split_parameters"]

STATE_FILE = state_io.STATE_FILE


class ID3Engine:
    """Selective fine-tuning state and the per-step unmasking logic.

    `settings` describe the training loop (`TrainingSettings`; `ID3Trainer` hands in its own); every mode
    is decided from them and the config once, into `engine.plan`.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> engine = ID3Engine(model, ID3Config(budget=3))
        >>> engine.start(total_steps=2)
        >>> model(torch.randn(8, 4)).pow(2).sum().backward()
        >>> engine.step()["unmasked"]
        2
    """

    def __init__(
        self,
        model: nn.Module,
        config: ID3Config | None = None,
        seed: int | None = None,
        settings: TrainingSettings | None = None,
    ) -> None:
        self.config = config or ID3Config()
        if (
            self.config.optimizer == "auto"
        ):  # a plain loop builds its own optimizer: SparseAdamW, as documented
            self.config = replace(self.config, optimizer="sparse_adamw")
        self.model = model
        selectable, dense = split_parameters(model, self.config)
        self.seed = self.config.mask_seed if self.config.mask_seed is not None else (seed or 0)
        self.unmasked = UnmaskedSet(selectable, dense)
        self.method = get_method(self.config.method)(self)
        self.plan: Plan = resolve_plan(
            model,
            self.config,
            self.method,
            selectable,
            dense,
            settings or TrainingSettings(),
            is_distributed(),
        )
        self.scan = Scan(self.unmasked, self.plan.offsets, self.plan.row_sparse_scoring)
        self.schedule: Schedule | None = None
        self.steps_done = 0  # optimizer steps seen by `step`
        self.updates_total = 0  # sum over steps of the number of trainable entries (the paper's update count)
        self.skipped_steps = 0  # optimizer steps that were due to grow the set and grew nothing
        # T of the run a loaded checkpoint state belongs to: `start` refuses another one.
        self.resumed_total_steps: int | None = None
        self._log = {"selection_s": 0.0, "steps": 0, "new": 0}
        self.last_stats: dict = {}
        self.last_selected_scores: torch.Tensor | None = None  # of the last selection (score histograms)
        # What `start` installs from the plan; `remove_hooks` takes it out again.
        self._sparse_hooks: RowSparseEmbeddings | None = None
        self._recompute: PointwiseRecompute | None = None
        self.low_memory_mode: LowMemoryMode | None = None
        self.bounded: BoundedGrads | None = None
        self._bounded_cut: float | None = None  # last step's cut, kept across remove_hooks / load
        # weight_grads='bounded': each layer's branch (GEMM rows or the bound), measured in the first steps
        self.branch_costs = BranchCosts(self.config.bounded_gemm_tokens)

    # ------------------------------------------------------------------------------------------ the plan
    @property
    def budget(self) -> int:
        """Selectable entries to unmask over the run (the plan's; see `plan.resolve_budget`)."""
        return self.plan.budget

    @property
    def selectable(self) -> int:
        return self.plan.selectable_entries

    @property
    def dense_entries(self) -> int:
        return self.plan.dense_entries

    @property
    def low_memory(self) -> bool:
        """Whether the plan runs the low-memory mode (installed from `start` on: `low_memory_active`)."""
        return self.plan.low_memory

    @property
    def sparse_grads(self) -> bool:
        """Whether the plan gives large embedding tables row-sparse gradients (installed from `start` on)."""
        return self.plan.sparse_grads

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimizer should see: selectable ones, then dense ones."""
        return [*self.unmasked.params.values(), *self.unmasked.dense.values()]

    def start(self, total_steps: int, calibration_batches: CalibrationBatches | None = None) -> None:
        """Fix the schedule for `total_steps` optimizer steps, choose static masks, install the plan's hooks.

        `calibration_batches` (outside the Trainer) feeds methods that need data before training, e.g.
        'fish'; by default the settings' (`TrainingSettings.calibration_batches`).
        """
        if total_steps is None or total_steps < 1:
            raise ValueError(
                f"ID3 needs the number of optimizer steps T to spread the budget (got {total_steps}). "
                "Set max_steps, or give the dataset a length."
            )
        if self.resumed_total_steps is not None and total_steps != self.resumed_total_steps:
            raise state_io.StateError(
                f"the loaded ID3 state belongs to a run of {self.resumed_total_steps:,} optimizer steps, this run "
                f"has {total_steps:,}: the schedule would differ. Resume with max_steps={self.resumed_total_steps}, "
                "or start a new run (another output_dir)."
            )
        self.schedule = Schedule(self.config.scheduler, self.budget, total_steps)
        if self.steps_done == 0 and len(self.unmasked) == 0:
            batches = calibration_batches or self.plan.settings.calibration_batches
            ctx = StepContext(self.budget, self.budget, 0, self.scan, calibration_batches=batches)
            self._apply(self.method.on_start(ctx))
        if (
            self.plan.sparse_grads or self.plan.bounded_layers
        ) and is_distributed():  # no process group before?
            self.plan = with_process_group(self.plan, self.config, self.method)
        plan = self.plan
        if plan.sparse_grads and plan.row_sparse_tables and self._sparse_hooks is None:
            self._sparse_hooks = RowSparseEmbeddings(dict(plan.row_sparse_tables))
        if plan.recompute and self._recompute is None:
            self._recompute = PointwiseRecompute(self.model)
        if plan.low_memory and self.low_memory_mode is None:
            self.low_memory_mode = LowMemoryMode(
                self.unmasked,
                self.scan,
                self.method.score_fn(),
                lambda: self.schedule.target(self.steps_done + 1) - len(self.unmasked),
                plan.tied_tables if plan.sparse_grads else None,
            )
        if plan.bounded_layers and self.bounded is None:
            score_fn = self.method.score_fn()
            tied = None
            if plan.bounded_tied:  # the token rows of tables tied to a bounded output layer
                tied = TiedOutputRows(
                    plan.bounded_tied, self.unmasked, plan.offsets, self.scan.sorted_unmasked
                )
            self.bounded = BoundedGrads(
                plan.bounded_layers,
                self.unmasked,
                plan.offsets,
                self.scan.sorted_unmasked,
                lambda: self.scan.scorer(score_fn, keep_grads=True),
                lambda: self.schedule.target(self.steps_done + 1) - len(self.unmasked),
                tied,
                self.branch_costs,
            )
            self.bounded.last_cut = self._bounded_cut
            self.scan.bounded = self.bounded

    def remove_hooks(self) -> None:
        """Uninstall the low-memory gradient hooks and the row-sparse embedding hooks, so later backwards
        leave `p.grad` alone and dense, and turn pointwise recomputation off (the Trainer does this at train
        end; `start` puts them back)."""
        if self.low_memory_mode is not None:
            self.low_memory_mode.remove()
            self.low_memory_mode = None
        if self._sparse_hooks is not None:
            self._sparse_hooks.remove()
            self._sparse_hooks = None
        if self._recompute is not None:
            self._recompute.remove()
            self._recompute = None
        if self.bounded is not None:
            self._bounded_cut = self.bounded.last_cut
            self.bounded.remove()
            self.bounded = self.scan.bounded = None

    @property
    def low_memory_active(self) -> bool:
        """True while the low-memory gradient hooks are installed (from `start` on)."""
        return self.low_memory_mode is not None

    @property
    def recompute_active(self) -> bool:
        """True while pointwise recomputation is installed (`ID3Config.recompute_pointwise`, from `start` on)."""
        return self._recompute is not None

    @property
    def sparse_tables(self) -> list[str]:
        """Names of the embedding tables whose backward is row-sparse right now (empty when the mode is off)."""
        return list(self._sparse_hooks.modules) if self._sparse_hooks is not None else []

    @property
    def streamed_tables(self) -> list[str]:
        """Names of the tied tables whose gradient is never built whole right now (low-memory mode only)."""
        return self.low_memory_mode.streamed_tables if self.low_memory_mode is not None else []

    def summary(self, optimizer: str | None = None) -> str:
        """The train-begin summary; `optimizer` says which optimizer runs and why (the Trainer glue knows)."""
        pct = 100.0 * self.budget / max(self.selectable, 1)
        n_tensors = len(self.unmasked.params)
        lines = [
            f"ID3 [{self.config.method}]: budget {self.budget:,} of {self.selectable:,} selectable entries "
            f"({pct:.3g}%) in {n_tensors} tensors",
        ]
        if self.schedule is not None and self.method.incremental:
            lines.append(f"  schedule: {self.schedule.describe()}")
        lines.append(f"  score: |g| / (|theta| + {self.config.eps:g})^{self.config.exp:g}")
        lines.append(f"  optimizer: {optimizer or self.config.optimizer}")
        if self.method.describe():
            lines.append(f"  method: {self.method.describe()}")
        if self.low_memory_active:
            lines.append("  low-memory mode: gradients scored and freed as backward completes them")
        if self.sparse_tables:
            lines.append(f"  row-sparse embedding gradients: {', '.join(self.sparse_tables)}")
        if self.streamed_tables:
            lines.append(
                f"  tied tables scored in blocks as backward computes them: {', '.join(self.streamed_tables)}"
            )
        if self.bounded is not None:
            lines.extend(self.plan.bounded_lines(self.branch_costs.summary()))
        if self.recompute_active:
            lines.append(
                "  pointwise recomputation: products and activations of kept tensors are redone in backward"
            )
        lines.extend(self.plan.reasons())
        if self.unmasked.dense:
            where = "inside" if self.config.dense_in_budget else "outside"
            lines.append(
                f"  dense: {len(self.unmasked.dense)} tensors, {self.dense_entries:,} entries, {where} the budget"
            )
        return "\n".join(lines)

    # ---------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, grad_scale: float = 1.0, check_overflow: bool = False) -> dict:
        """Call after backward, before clipping and the optimizer step: grow the set, mask the gradients.

        `grad_scale` is the fp16 loss scale (scores use unscaled gradients). With `check_overflow`, a step
        whose gradients hold Inf/NaN grows nothing (the optimizer will skip it); the shortfall carries over.
        """
        if self.schedule is None:
            raise RuntimeError("call engine.start(total_steps) before the first engine.step().")
        self._warn_if_recompute_saw_no_forward()
        t0 = time.perf_counter()
        before = len(self.unmasked)
        self.steps_done += 1
        k = self.schedule.target(self.steps_done) - before
        self.scan.begin_step()
        if self.low_memory_mode is not None and grad_scale != 1.0:
            raise ValueError(
                "low_memory=True cannot use fp16 loss scaling: the scaler unscales p.grad, which this mode "
                "frees during backward. Train in bf16/fp32, or set ID3Config(low_memory=False)."
            )
        with selection_threads():  # many small ops: on one thread they need no barrier (see selection.py)
            if self.low_memory_mode is not None:  # scored in backward already: collect the winners
                selection = self.low_memory_mode.finish(k)
            else:
                if self.bounded is not None:
                    self._check_bounded_grads()
                    self.bounded.finish_backward()  # a tied table's token rows: both gradients are in
                ctx = StepContext(k, self.budget, before, self.scan, grad_scale, check_overflow)
                selection = self.method.on_step(ctx)
        grew = self.scan.finite or not check_overflow
        counts = {n: self.unmasked.indices[n].numel() for n in self.bounded.layers} if self.bounded else {}
        if grew:
            self._apply(selection)
        if self.bounded is not None:
            self._stash_new_bounded(counts, selection, k)
        # Rows found on this very gradient object only (a method may have scored something else).
        params = self.unmasked.params
        rows = {n: r for n, (g, r) in self.scan.nonzero_rows.items() if params[n].grad is g}
        self.scan.nonzero_rows = {}  # it holds gradients: kept past this step, they would outlive zero_grad
        self.unmasked.mask_gradients(rows)
        if self.low_memory_mode is not None:
            # The sorted index copies the hooks need, made now rather than inside the next backward.
            for name in self.unmasked.params:
                self.scan.sorted_unmasked(name)
        new = len(self.unmasked) - before
        if not grew or (k > 0 and new <= 0):  # an fp16 overflow, or no finite score: the share carries over
            self.skipped_steps += 1
        elapsed = time.perf_counter() - t0
        self.updates_total += len(self.unmasked) + self.dense_entries
        self._log["selection_s"] += elapsed
        self._log["steps"] += 1
        self._log["new"] += max(new, 0)
        self.last_stats = {
            "unmasked": len(self.unmasked),
            "new": new,
            "selection_s": elapsed,
            "skipped": not grew,
        }
        return self.last_stats

    def _check_bounded_grads(self) -> None:
        bp = self.bounded.current
        for name in self.bounded.layers:
            if self.unmasked.params[name].grad is not None and bp is not None and name in bp.seen:
                raise RuntimeError(
                    f"weight_grads='bounded': {name} also received a dense gradient (the weight is used outside "
                    "its module, or under autocast in part of the step). Set ID3Config(weight_grads='dense')."
                )

    def _stash_new_bounded(self, counts: dict[str, int], selection: Selection | None, k: int) -> None:
        """The bounded layers' newly unmasked entries: their gradient values after the kept ones (the layers
        have no `p.grad`); then close the step's pass with its cut (the next step's threshold guess)."""
        for name, before in counts.items():
            new = self.unmasked.indices[name][before:]
            if new.numel():
                grads = self.bounded.grads_for(name, new).to(self.unmasked.params[name].dtype)
                kept = self.unmasked.grad_stash.get(name)
                self.unmasked.grad_stash[name] = grads if kept is None else torch.cat([kept, grads])
        scores = None if selection is None else selection.scores
        cut = float(scores[k - 1]) if scores is not None and k > 0 and scores.numel() >= k else None
        self.bounded.end_step(cut)

    def _warn_if_recompute_saw_no_forward(self) -> None:
        if self._recompute is not None and self._recompute.forwards == 0 and not self._recompute.warned:
            self._recompute.warned = True
            warnings.warn(
                "pointwise recomputation saw no forward of the model given to ID3Engine: the loop calls it "
                "through something that bypasses its forward hooks. Give the engine the module the loop "
                "calls, or set ID3Config(recompute_pointwise=False).",
                stacklevel=3,
            )

    def _apply(self, selection: Selection | None) -> None:
        """The only place the set changes: add (or, for repeat-S, replace) the selection's entries."""
        if selection is None:
            return
        if selection.scores is not None:
            self.last_selected_scores = selection.scores.detach().cpu()
        for name in selection.whole:
            self.unmasked.unmask_all(name)
        if selection.index is None:
            return
        for name, (local, grads) in self.scan.split_global(selection.index, selection.grads).items():
            if selection.replace:
                self.unmasked.replace(name, local)
            elif local.numel():
                self.unmasked.add(name, local)
                if (
                    grads is not None
                ):  # low-memory mode: the new entries' gradient values, after the kept ones
                    kept = self.unmasked.grad_stash.get(name)
                    new = grads.to(self.unmasked.params[name].dtype)
                    self.unmasked.grad_stash[name] = (
                        new if kept is None else torch.cat([kept, new.to(kept.dtype)])
                    )

    def add_global(self, global_index: torch.Tensor) -> None:
        """Unmask entries given by global flat index (selectable tensors in order, concatenated)."""
        self._apply(Selection(global_index))

    # ------------------------------------------------------------------------------ gradients the optimizer reads
    def grad_norm(self) -> torch.Tensor:
        """L2 norm of the model's gradients as the optimizer sees them (masked entries count as 0).

        O(B) for selectable tensors: it reads only unmasked entries (from `p.grad` or the low-memory stash).
        """
        return self._norm(self._optimizer_grads())

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the gradients the optimizer will read, in O(B).

        The norm is `grad_norm()` (masked entries count as 0); every gradient is then scaled by
        min(1, max_norm / (norm + 1e-6)), as torch does, but selectable tensors only at their unmasked entries
        (the rest are 0): dense or row-sparse `p.grad`, or the low-memory mode's kept values. Call it after
        `engine.step()` (masking), before the optimizer step. Returns the norm before clipping.
        """
        grads = self._optimizer_grads()  # read once: for the norm, then scaled and written back
        norm = self._norm(grads)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        whole = []
        for p, idx, values in grads:
            if p.grad is None:  # the low-memory mode's kept values, scaled in place
                values.mul_(coef.to(p.device))
            elif p.grad.is_sparse:
                p.grad = as_coalesced(p.grad)
                p.grad._values().mul_(coef.to(p.device))
            elif idx is None:
                whole.append(p.grad)
            else:
                p.grad.view(-1).index_copy_(0, idx, values.mul_(coef.to(p.device)))
        if whole:
            torch._foreach_mul_(whole, coef.to(whole[0].device))
        return norm

    def _optimizer_grads(self) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """(parameter, its unmasked indices or None for all of it, the gradient values the optimizer reads)
        for every parameter with any: the unmasked entries of `p.grad` (a copy), the low-memory mode's kept
        values (the stash tensor itself), or the whole `p.grad` (a row-sparse one: its values)."""
        selectable = {id(p): name for name, p in self.unmasked.params.items()}
        out = []
        for p in self.model.parameters():
            name = selectable.get(id(p))
            idx = None if name is None else self.unmasked.indices_for(p)
            if idx is None:
                values = None if p.grad is None else p.grad.detach()
                if values is not None and values.is_sparse:
                    values = values.coalesce().values()
            elif p.grad is not None:
                values = gather_entries(p.grad.detach(), idx)
            else:
                values = self.unmasked.grad_stash.get(name)
            if values is not None and values.numel():
                out.append((p, idx, values))
        return out

    @staticmethod
    def _norm(grads: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
        if not grads:
            return torch.zeros(())
        norms = [torch.linalg.vector_norm(values.float()) for _, _, values in grads]
        # Like torch's clip_grad_norm_: the norm of the per-tensor norms.
        return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))

    def log_metrics(self) -> dict[str, float]:
        """Metrics since the last call, for the Trainer's log line."""
        steps = max(self._log["steps"], 1)
        static_updates = self.steps_done * (self.budget + self.dense_entries)
        metrics = {
            "id3/unmasked": len(self.unmasked),
            "id3/budget_used": len(self.unmasked) / max(self.budget, 1),
            "id3/new_per_step": self._log["new"] / steps,
            "id3/selection_ms": 1000.0 * self._log["selection_s"] / steps,
            "id3/updates_total": self.updates_total,
            "id3/updates_vs_static": self.updates_total / max(static_updates, 1),
        }
        self._log = {"selection_s": 0.0, "steps": 0, "new": 0}
        if self.bounded is not None:
            metrics.update(self.bounded.log_metrics())
        return metrics

    def budget_shortfall(self) -> str | None:
        """Why the set holds fewer than the budget's entries (None when it holds them all), for a warning."""
        if len(self.unmasked) >= self.budget:
            return None
        total = self.schedule.total_steps if self.schedule is not None else "?"
        return (
            f"ID3 ended with {len(self.unmasked):,} of its budget of {self.budget:,} entries unmasked after "
            f"{self.steps_done:,} of {total} optimizer steps; {self.skipped_steps:,} steps grew nothing (an fp16 "
            "overflow, or no finite score: NaN/Inf gradients). Train to max_steps, or look for NaN/Inf losses; "
            "the delta holds only the entries unmasked."
        )

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        total_steps = self.schedule.total_steps if self.schedule is not None else self.resumed_total_steps
        return {
            "format": state_io.FORMAT,
            "global_step": self.steps_done,
            "fingerprint": state_io.fingerprint(self, total_steps),
            "config": self.config.to_dict(),
            "budget": self.budget,
            "steps_done": self.steps_done,
            "updates_total": self.updates_total,
            "skipped_steps": self.skipped_steps,
            "unmasked": self.unmasked.state_dict(),
            "method": self.method.state_dict(),
            # weight_grads='bounded': last step's cut sets the next threshold, so a resumed run is bitwise
            "bounded_cut": self.bounded.last_cut if self.bounded is not None else self._bounded_cut,
            # ... and so do the branch choices measured in its first steps
            "bounded_costs": self.branch_costs.state_dict(),
        }

    def load_state_dict(
        self,
        state: dict,
        source: str = "the state dict",
        global_step: int | None = None,
        total_steps: int | None = None,
    ) -> None:
        """Load a state from `state_dict`, after `state.verify` (raises `StateError`, loading nothing)."""
        if not isinstance(state, dict) or state.get("format") not in (
            state_io.FORMAT,
            state_io.LEGACY_FORMAT,
        ):
            raise state_io.StateError(f"{source} is not an ID3 engine state (missing format tag).")
        state_io.verify(state, self, source, global_step, total_steps)
        self.unmasked.load_state_dict(state["unmasked"])
        self.steps_done = state["steps_done"]
        self.updates_total = state["updates_total"]
        self.skipped_steps = state["skipped_steps"]
        self.method.load_state_dict(state["method"])
        self.resumed_total_steps = state.get("fingerprint", {}).get("total_steps")
        self._bounded_cut = state.get("bounded_cut")
        self.branch_costs.load_state_dict(state.get("bounded_costs"))
        if self.bounded is not None:
            self.bounded.last_cut = self._bounded_cut

    def save(self, directory: str | os.PathLike) -> str:
        """Write the state into `directory` atomically (temp file + rename) and fsynced; returns the file path."""
        path = os.path.join(directory, STATE_FILE)
        return state_io.write_durably(path, state_io.encode(self.state_dict()))

    def load(
        self, directory: str | os.PathLike, global_step: int | None = None, total_steps: int | None = None
    ) -> None:
        """Load the state `save` wrote, verified first (`state.verify`): checksum, settings, indices, and the
        step when `global_step` is given. Raises `StateError` and loads nothing if any check fails."""
        path = os.path.join(os.fspath(directory), STATE_FILE)
        self.load_state_dict(state_io.read_state(path), path, global_step, total_steps)


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
