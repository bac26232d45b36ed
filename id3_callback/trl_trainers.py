"""ID3 on TRL's trainers: the same mixin as `ID3Trainer`, on `trl.SFTTrainer`, `DPOTrainer` and `GRPOTrainer`.

Needs `trl` (`pip install 'id3-callback[trl]'`). With `peft_config`, TRL wraps the model in LoRA first and
ID3 then selects among the adapter entries, as with a peft model passed to `ID3Trainer`.

Example:
    >>> from id3_callback import ID3Callback, ID3Config, ID3SFTTrainer
    >>> trainer = ID3SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
    ...                         callbacks=[ID3Callback(ID3Config(budget=0.001))])  # doctest: +SKIP
"""

from __future__ import annotations

try:
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer
except ImportError as err:  # a clear message instead of trl's own, from deep inside
    raise ImportError(
        "ID3SFTTrainer, ID3DPOTrainer and ID3GRPOTrainer need TRL: pip install trl (or pip install 'id3-callback[trl]')"
    ) from err

from .trainer import ID3TrainerMixin


class ID3SFTTrainer(ID3TrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` with ID3 selective fine-tuning (same arguments as `SFTTrainer`, plus an
    `ID3Callback` in `callbacks`)."""


class ID3DPOTrainer(ID3TrainerMixin, DPOTrainer):
    """`trl.DPOTrainer` with ID3 selective fine-tuning (the policy's entries; the reference model is frozen)."""


class ID3GRPOTrainer(ID3TrainerMixin, GRPOTrainer):
    """`trl.GRPOTrainer` with ID3 selective fine-tuning (selection on the policy loss's gradients)."""
