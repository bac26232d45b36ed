"""`ID3Trainer`: the Trainer with one extra stage between backward and the optimizer step.

On the last micro-batch of each accumulation window, after backward, the engine scores the accumulated
gradients, grows the unmasked set, and zeroes masked gradients, before clipping and the optimizer step.
The overrides live in a mixin so `Seq2SeqTrainer` (or any Trainer subclass) gets them without a copy.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from functools import partial

import torch
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import state as state_io
from .callback import ID3Callback
from .distributed import check_consistency, check_distributed_support
from .engine import ID3Engine
from .optim import SparseAdamW, choose_optimizer, guard_weight_decay
from .plan import TrainingSettings


class ID3TrainerMixin:
    """Adds ID3 to a `Trainer` subclass. Requires an `ID3Callback` among `callbacks`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, ID3Callback)]
        if len(callbacks) != 1:
            raise ValueError(
                f"ID3Trainer needs exactly one ID3Callback in `callbacks` (found {len(callbacks)}): "
                "pass callbacks=[ID3Callback(ID3Config(...))]."
            )
        if self.is_deepspeed_enabled:
            raise ValueError(
                "ID3 does not support DeepSpeed: ZeRO partitions gradients and optimizer state, so no rank sees "
                "the whole gradient to score. Use DDP instead (torchrun / accelerate launch without a DeepSpeed "
                "config); see docs/distributed.md."
            )
        self.id3 = callbacks[0]
        check_distributed_support(self, self.id3.config)  # FSDP / TP / low_memory under DDP: refuse early
        # 'auto' honours TrainingArguments.optim unless it is the Trainer's default AdamW (then SparseAdamW).
        given = self.optimizer is not None or getattr(self, "optimizer_cls_and_kwargs", None) is not None
        default_optim = type(self.args).__dataclass_fields__["optim"].default
        kind, note = choose_optimizer(
            self.id3.config.optimizer, _optim_name(self.args.optim), _optim_name(default_optim), given
        )
        self.id3.attach(
            self.model, seed=self.args.seed, settings=self.id3_settings(), optimizer=kind, optimizer_note=note
        )
        self._clips_inline = trainer_clips_inline()
        self._engine_clip_norm: torch.Tensor | None = None
        if self.args.world_size > 1 and self.args.device.type == "cpu":
            _allow_indexed_cpu_locations()
        # Mask heatmap PNG in output_dir, and W&B mask panels when report_to includes wandb.
        from .logging import attach_logging

        attach_logging(self)

    def id3_settings(self) -> TrainingSettings:
        """This Trainer's training loop as the engine's plan needs it (see `plan.TrainingSettings`)."""
        return TrainingSettings(
            accumulation_steps=self.args.gradient_accumulation_steps,
            loss_scaling=bool(self.args.fp16),
            # Trainers that predate the `_clip_grad_norm` hook clip inline; there the engine clips first and
            # the inline call returns its norm (`_inline_clip`), so torch never reads p.grad on any version.
            torch_clipping=False,
            # Clipping and the gradient norm below go through the engine: row-sparse embedding gradients are
            # on wherever they apply.
            grads_through_engine=True,
            compiled=bool(getattr(self.args, "torch_compile", False)),
            # Training batches for methods that need data before training (FISH's Fisher pass).
            calibration_batches=partial(trainer_calibration_batches, self),
        )

    @property
    def engine(self) -> ID3Engine:
        return self.id3.engine

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.engine.config.optimizer == "sparse_adamw":
            decay = set(self.get_decay_parameter_names(self.model))
            names = {id(p): n for n, p in self.model.named_parameters()}
            params = self.engine.parameters()
            groups = [
                {
                    "params": [p for p in params if names[id(p)] in decay],
                    "weight_decay": self.args.weight_decay,
                },
                {"params": [p for p in params if names[id(p)] not in decay], "weight_decay": 0.0},
            ]
            self.optimizer = SparseAdamW(
                [g for g in groups if g["params"]],
                self.engine.unmasked,
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
            return self.optimizer
        # transformers 4.x's create_optimizer takes no model argument; 5.x passes one only in some set-ups.
        optimizer = super().create_optimizer() if model is None else super().create_optimizer(model)
        guard_weight_decay(optimizer, self.engine.unmasked)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and scaler.is_enabled():
                self.engine.step(grad_scale=float(scaler.get_scale()), check_overflow=True)
            else:
                self.engine.step()
            if self._clips_inline:
                self._inline_clip()
        return loss

    def _inline_clip(self) -> None:
        # Trainers without the `_clip_grad_norm` hook (transformers 4.x) clip inline, right after the last
        # micro-batch's training_step, with `accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)`
        # over dense p.grad (which misses row-sparse and low-memory gradients). The engine clips here
        # instead, at the same point of the step and with the same max_grad_norm and formula, and the inline
        # call then returns that norm without touching the gradients. Under fp16 the Trainer's own pass
        # stays (it also unscales; neither row-sparse gradients nor the low-memory mode run with fp16).
        max_norm = self.args.max_grad_norm
        if max_norm is None or max_norm <= 0 or self._loss_scaled():
            return
        accelerator = self.accelerator  # re-created by hyperparameter search: hook the current one
        if not getattr(accelerator.clip_grad_norm_, "_id3_hook", False):
            accelerator.clip_grad_norm_ = partial(_clip_grad_norm_hook, self, accelerator.clip_grad_norm_)
            accelerator.clip_grad_norm_._id3_hook = True
        self._engine_clip_norm = self.engine.clip_grad_norm_(max_norm)

    def _loss_scaled(self) -> bool:
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler is not None and scaler.is_enabled()

    def _clip_grad_norm(self, model):
        # torch's clip_grad_norm_ reads every dense gradient (mostly zeros after masking), cannot read a
        # row-sparse one, and would miss the low-memory mode's kept values. Masked entries are 0, so scaling
        # the unmasked ones (the engine, O(B)) scales everything. Under fp16 the Trainer's pass also unscales
        # the gradients, so it is kept there (neither row-sparse gradients nor low-memory mode run with fp16).
        if not self._loss_scaled():
            return self.engine.clip_grad_norm_(self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        # Without clipping the Trainer still takes the norm of every dense gradient each step; the engine
        # reads only unmasked entries (O(B)), as for clipping above.
        if grad_norm is None and not self._loss_scaled():
            return self.engine.grad_norm()
        return super()._get_grad_norm(model, grad_norm)

    def add_callback(self, callback):
        if isinstance(callback, ID3Callback) or (
            isinstance(callback, type) and issubclass(callback, ID3Callback)
        ):
            raise ValueError(
                "ID3Trainer takes its ID3Callback when it is built, and already has one (trainer.id3): pass "
                "callbacks=[ID3Callback(ID3Config(...))] to ID3Trainer(...), and build a new trainer to change it."
            )
        super().add_callback(callback)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        return super().train(self._resume_point(resume_from_checkpoint), *args, **kwargs)

    def _resume_point(self, resume):
        """The checkpoint to resume from, its ID3 state verified before the Trainer loads anything.

        `True` takes the newest *complete* checkpoint (warning about newer ones a crash left incomplete);
        an explicit incomplete folder is refused, naming the newest complete one before it.
        """
        if resume is None or resume is False:
            return resume
        if resume is True:
            found = state_io.checkpoints(self.args.output_dir)
            if not found:
                return resume  # the Trainer's own "no valid checkpoint" error
            folder = state_io.resumable_checkpoint(self.args.output_dir)
            if folder is None:
                raise state_io.refuse_incomplete(found[0], state_io.incomplete_reason(found[0]))
            skipped = found[: found.index(folder)]
            if skipped:
                why = "; ".join(f"{f}: {state_io.incomplete_reason(f)}" for f in skipped)
                warnings.warn(
                    f"resume_from_checkpoint=True: resuming from {folder}, the newest complete checkpoint; newer "
                    f"ones are incomplete (interrupted save?): {why}.",
                    stacklevel=3,
                )
        else:
            folder = os.fspath(resume)
            if state_io.read_global_step(folder) is None or not os.path.exists(
                os.path.join(folder, state_io.STATE_FILE)
            ):
                raise state_io.refuse_incomplete(folder, state_io.incomplete_reason(folder))
        total = self.args.max_steps if self.args.max_steps > 0 else None  # else checked at train begin
        state_io.load_verified(folder, self.engine, state_io.read_global_step(folder), total)
        return folder

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        check_consistency(self.engine, f"the checkpoint of step {self.state.global_step}")  # all ranks
        if self.args.should_save:
            # The ID3 state goes in first, durably, before the Trainer writes trainer_state.json (which marks
            # the folder complete) and rotates older checkpoints away: a crash at any point leaves either a
            # complete new checkpoint or an incomplete folder beside the previous complete one. Same order in
            # transformers 4.46-5.x: save_model, optimizer, scaler, RNG, trainer_state.json, rotation.
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            state_io.begin_checkpoint(folder)
            self.engine.save(folder)
        super()._save_checkpoint(model, trial, *args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None:
            # Verified again and loaded before the optimizer, so a state that does not fit fails here, clearly.
            self.engine.load(checkpoint, global_step=state_io.read_global_step(checkpoint))
            check_consistency(self.engine, f"resume from {checkpoint}")
        super()._load_optimizer_and_scheduler(checkpoint)

    def log(self, logs, *args, **kwargs):
        # transformers 4.46 takes log(logs) only; 4.48 and later add start_time.
        if "loss" in logs and self.engine.steps_done:
            logs.update(self.engine.log_metrics())
        super().log(logs, *args, **kwargs)


def trainer_clips_inline() -> bool:
    """Whether this transformers' Trainer clips inline (4.x) rather than through `_clip_grad_norm` (5.x)."""
    return not hasattr(Trainer, "_clip_grad_norm")


def _clip_grad_norm_hook(trainer, original, parameters, max_norm, *args, **kwargs):
    """`accelerator.clip_grad_norm_` while ID3 trains: the engine has clipped already; return its norm."""
    norm, trainer._engine_clip_norm = trainer._engine_clip_norm, None
    if norm is None:  # not a step the engine clipped (fp16, or a call from elsewhere): the real thing
        return original(parameters, max_norm, *args, **kwargs)
    return norm


def _allow_indexed_cpu_locations() -> None:
    # Under CPU DDP, transformers 4.57 loads the optimizer state with map_location=args.device, which is
    # torch.device("cpu", rank); torch cannot restore a storage to "cpu:N" ("don't know how to restore data
    # location ... tagged with cpu:0"). CPU memory has no index: restore such storages on the CPU.
    global _INDEXED_CPU_REGISTERED
    if _INDEXED_CPU_REGISTERED:
        return
    torch.serialization.register_package(
        100, lambda obj: None, lambda obj, location: obj if location.startswith("cpu:") else None
    )
    _INDEXED_CPU_REGISTERED = True


_INDEXED_CPU_REGISTERED = False


def _optim_name(optim) -> str:
    return str(getattr(optim, "value", optim))


class ID3Trainer(ID3TrainerMixin, Trainer):
    """`transformers.Trainer` with ID3 selective fine-tuning.

    Example:
        >>> trainer = ID3Trainer(model=model, args=args, train_dataset=ds,
        ...                      callbacks=[ID3Callback(ID3Config(budget=0.0017))])  # doctest: +SKIP
        >>> trainer.train()                                                            # doctest: +SKIP
    """


class ID3Seq2SeqTrainer(ID3TrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` with ID3 selective fine-tuning (same arguments as `ID3Trainer`)."""


def _batch_size(inputs: dict) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("cannot tell the batch size: no tensor among the inputs.")


def trainer_calibration_batches(trainer) -> Iterator[tuple[torch.Tensor, int]]:
    """The Trainer's training data as (loss, batch size) pairs for methods that calibrate before training.

    A plain DataLoader over `train_dataset` (same collator, column removal and batch size as training) in a
    random order seeded by the engine's seed. It never touches the training DataLoader: an accelerate-prepared
    loader that is left early stays registered as active, and its sampler's epoch counter would move. The loss
    is `trainer.compute_loss` on the wrapped model, so under DDP every rank sees the same, all-reduced gradients.

    Example:
        >>> batches = trainer_calibration_batches(trainer)  # doctest: +SKIP
    """
    from torch.utils.data import DataLoader, IterableDataset, RandomSampler

    dataset, collator = trainer.train_dataset, trainer.data_collator
    try:
        import datasets

        is_hf = isinstance(dataset, datasets.Dataset)
    except ImportError:
        is_hf = False
    if is_hf:
        dataset = trainer._remove_unused_columns(dataset, description="calibration")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="calibration")
    sampler = None
    if not isinstance(dataset, IterableDataset):
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(trainer.engine.seed))
    loader = DataLoader(dataset, batch_size=trainer._train_batch_size, sampler=sampler, collate_fn=collator)
    model = trainer.model_wrapped
    for batch in loader:
        inputs = trainer._prepare_inputs(batch)
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        yield loss, _batch_size(inputs)
