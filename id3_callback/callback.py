"""`ID3Callback`: holds the engine and wires it to the Trainer's lifecycle (start, log, save)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace

from torch import nn
from transformers import TrainerCallback

from .config import ID3Config
from .distributed import check_consistency
from .engine import ID3Engine
from .plan import TrainingSettings

logger = logging.getLogger("id3_callback")


class ID3Callback(TrainerCallback):
    """Selective fine-tuning state for a Trainer run. Use it with `ID3Trainer` (which does the per-step work).

    Example:
        >>> callback = ID3Callback(ID3Config(budget=100_000))
        >>> trainer = ID3Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])  # doctest: +SKIP
    """

    def __init__(self, config: ID3Config | None = None, **overrides) -> None:
        if config is None:
            config = ID3Config(**overrides)
        elif overrides:
            raise TypeError("pass either an ID3Config or keyword overrides, not both")
        self.config = config
        self.engine: ID3Engine | None = None
        self.optimizer_note: str | None = None  # which optimizer trains, and why (set by ID3Trainer)

    def attach(
        self,
        model: nn.Module,
        seed: int | None = None,
        settings: TrainingSettings | None = None,
        optimizer: str | None = None,
        optimizer_note: str | None = None,
    ) -> ID3Engine:
        """Build the engine for `model` under the Trainer's `settings` (called by `ID3Trainer.__init__`);
        `optimizer` is the resolved `ID3Config.optimizer` ('auto' decided by the Trainer glue).

        One callback serves one trainer: a second would re-point the engine and lose the first run's set.
        """
        if self.engine is not None:
            raise ValueError(
                "this ID3Callback already serves another trainer (its engine holds that run's unmasked set, which "
                "save_delta reads). Give each trainer its own: callbacks=[ID3Callback(ID3Config(...))]."
            )
        config = self.config if optimizer is None else replace(self.config, optimizer=optimizer)
        self.engine = ID3Engine(model, config, seed=seed, settings=settings)
        self.optimizer_note = optimizer_note
        return self.engine

    def on_train_begin(self, args, state, control, **kwargs):
        if self.engine is None:
            raise RuntimeError(
                "ID3Callback was added to a plain Trainer (or with callback_handler.add_callback after the trainer was "
                "built): masking must happen between backward and the optimizer step, which only ID3Trainer (or "
                "ID3Seq2SeqTrainer) does. Replace Trainer with ID3Trainer and pass callbacks=[ID3Callback(...)]."
            )
        if not state.max_steps or state.max_steps < 1:
            raise ValueError(
                "ID3 needs the number of optimizer steps to schedule the budget, and the Trainer could not tell it. "
                "Set TrainingArguments.max_steps (required for datasets without a length)."
            )
        self.engine.start(state.max_steps)
        check_consistency(self.engine, "train begin (after static masks are chosen)")  # DDP only
        if state.is_world_process_zero:
            summary = self.engine.summary(optimizer=self.optimizer_note)
            logger.info(summary)
            print(summary, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        every = self.config.consistency_check_steps
        if every and self.engine is not None and state.global_step % every == 0:
            check_consistency(self.engine, f"step {state.global_step}")  # no-op in a single process

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is not None:
            check_consistency(self.engine, "the end of training")
            self.engine.remove_hooks()  # low-memory mode: later backwards (evaluation, analysis) keep p.grad
        if self.engine is not None and state.is_world_process_zero:
            e = self.engine
            shortfall = e.budget_shortfall()
            if shortfall:
                warnings.warn(shortfall, stacklevel=2)
            logger.info(
                "ID3 done: %s entries unmasked (budget %s), %s parameter updates (%.3f of a static mask's)",
                f"{len(e.unmasked):,}",
                f"{e.budget:,}",
                f"{e.updates_total:,}",
                e.updates_total / max(e.steps_done * (e.budget + e.dense_entries), 1),
            )
