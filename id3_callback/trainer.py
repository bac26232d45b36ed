"""`ID3Trainer`: the Trainer with one extra stage between backward and the optimizer step.

On the last micro-batch of each accumulation window, after backward, the engine scores the accumulated
gradients, grows the unmasked set, and zeroes masked gradients, before clipping and the optimizer step.
The overrides live in a mixin so `Seq2SeqTrainer` (or any Trainer subclass) gets them without a copy.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .callback import ID3Callback
from .distributed import check_consistency, check_distributed_support
from .engine import ID3Engine
from .methods.fish import trainer_fisher_batches
from .optim import SparseAdamW, guard_weight_decay


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
        self.id3.attach(self.model, seed=self.args.seed)
        # Training batches for methods that need data before training (FISH's Fisher pass).
        self.engine.fisher_batches = partial(trainer_fisher_batches, self)
        # Low-memory mode needs one backward per step; else it warns and falls back. Row-sparse embedding
        # gradients are on wherever they apply: clipping and the gradient norm below go through the engine
        # (on every supported version: see `_inline_clip`). Both sets of hooks go in at train begin.
        fp16 = bool(self.args.fp16)
        self.engine.configure_low_memory(
            accumulation_steps=self.args.gradient_accumulation_steps, loss_scaling=fp16
        )
        self.engine.configure_sparse_grads(loss_scaling=fp16, auto=True)
        self._clips_inline = trainer_clips_inline()
        self._engine_clip_norm: torch.Tensor | None = None
        if self.args.world_size > 1 and self.args.device.type == "cpu":
            _allow_indexed_cpu_locations()
        # Mask heatmap PNG in output_dir, and W&B mask panels when report_to includes wandb.
        from .logging import attach_logging

        attach_logging(self)

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
        # transformers 4.x: create_optimizer(self); 5.x adds `model`.
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

    def _save_checkpoint(self, model, trial):
        check_consistency(self.engine, f"the checkpoint of step {self.state.global_step}")  # all ranks
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            self.engine.save(folder)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.engine.load(checkpoint)
            check_consistency(self.engine, f"resume from {checkpoint}")

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


class ID3Trainer(ID3TrainerMixin, Trainer):
    """`transformers.Trainer` with ID3 selective fine-tuning.

    Example:
        >>> trainer = ID3Trainer(model=model, args=args, train_dataset=ds,
        ...                      callbacks=[ID3Callback(ID3Config(budget=0.0017))])  # doctest: +SKIP
        >>> trainer.train()                                                            # doctest: +SKIP
    """


class ID3Seq2SeqTrainer(ID3TrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` with ID3 selective fine-tuning (same arguments as `ID3Trainer`)."""
