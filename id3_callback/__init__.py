"""ID3 selective fine-tuning for the Hugging Face Trainer (arXiv 2408.14470).

from id3_callback import ID3Config, ID3Callback, ID3Trainer, save_delta
callback = ID3Callback(ID3Config(budget=0.0017))
trainer = ID3Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
trainer.train()
save_delta(trainer, "sst2.delta.safetensors")
"""

from .config import ID3Config
from .delta import DeltaError, apply_delta, load_delta, remove_delta, save_delta
from .engine import ID3Engine
from .methods import SelectionMethod, available_methods, register_method
from .methods.base import Selection, StepContext
from .optim import SparseAdamW, guard_weight_decay
from .plan import Plan, TrainingSettings
from .schedulers import Schedule, register_scheduler
from .scores import d3_scores
from .state import StateError

__version__ = "0.1.0"

# ID3SFTTrainer, ID3DPOTrainer, ID3GRPOTrainer (needs trl) are attributes but not in __all__, so that
# `from id3_callback import *` works without trl.
__all__ = [
    "DeltaError",
    "ID3Callback",
    "ID3Config",
    "ID3Engine",
    "ID3Seq2SeqTrainer",
    "ID3Trainer",
    "ID3TrainerMixin",
    "Plan",
    "Schedule",
    "Selection",
    "SelectionMethod",
    "SparseAdamW",
    "StateError",
    "StepContext",
    "TrainingSettings",
    "apply_delta",
    "available_methods",
    "d3_scores",
    "guard_weight_decay",
    "load_delta",
    "register_method",
    "register_scheduler",
    "remove_delta",
    "save_delta",
]


def __getattr__(name):
    # The Trainer glue imports transformers (slow); the engine stays importable without it.
    if name == "ID3Callback":
        from .callback import ID3Callback

        return ID3Callback
    if name in ("ID3Trainer", "ID3Seq2SeqTrainer", "ID3TrainerMixin"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("ID3SFTTrainer", "ID3DPOTrainer", "ID3GRPOTrainer"):  # ImportError naming `pip install trl`
        from . import trl_trainers

        return getattr(trl_trainers, name)
    raise AttributeError(f"module 'id3_callback' has no attribute {name!r}")
