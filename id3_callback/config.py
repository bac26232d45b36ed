"""`ID3Config`: every knob of selective fine-tuning, in one `HfArgumentParser`-friendly dataclass."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

OPTIMIZERS = ("auto", "sparse_adamw", "trainer")
# Above this the D3 score is a step function of |theta| in float32; the paper uses exp in 0..2.
MAX_EXP = 16.0
_FLOAT32_TINY_LOG10 = math.log10(1.1754943508222875e-38)  # smallest normal float32


@dataclass
class ID3Config:
    """What to fine-tune and how to choose it.

    Field names avoid clashes with `TrainingArguments`, so both parse together::

        parser = HfArgumentParser((ID3Config, TrainingArguments))
        id3_config, training_args = parser.parse_args_into_dataclasses()

    Example:
        >>> ID3Config(budget=0.0017, exp=1.0).resolve_budget(22_713_216)
        38612
    """

    budget: float = field(
        default=0.0017,
        metadata={
            "help": "How many weight entries to fine-tune: an integer count (>= 1), or a float in (0, 1) read as "
            "a fraction of the selectable entries. The paper uses 103K and 320K on DeBERTa-v3-base."
        },
    )
    eps: float = field(
        default=1e-3, metadata={"help": "epsilon of the D3 score |g| / (|theta| + eps)^exp; keeps it finite."}
    )
    exp: float = field(
        default=1.0,
        metadata={"help": "Exponent of the D3 score's magnitude term; 0 scores by gradient magnitude alone."},
    )
    scheduler: str = field(
        default="uniform",
        metadata={
            "help": "How many entries join the unmasked set per step: 'uniform' (the paper: B/T per step, the "
            "remainder one each over the first steps), 'linear' or 'exponential' (front-loaded)."
        },
    )
    method: str = field(
        default="id3",
        metadata={"help": "Selection method; see `id3_callback.methods.available_methods()`."},
    )
    include: str | None = field(
        default=None,
        metadata={
            "help": "Regex on parameter names (re.search): only matching trainable parameters are selectable. "
            "Default: every trainable parameter."
        },
    )
    exclude: str | None = field(
        default=None,
        metadata={"help": "Regex on parameter names (re.search): matching parameters are never selected."},
    )
    dense: str | None = field(
        default=None,
        metadata={
            "help": "Regex on parameter names trained fully, e.g. a new classifier head ('classifier|score'). "
            "Dense entries are not selectable; see `dense_in_budget`."
        },
    )
    dense_in_budget: bool = field(
        default=False,
        metadata={
            "help": "Count dense entries against the budget (the selectable budget shrinks by their number). "
            "Default: dense entries are trained outside the budget and reported separately."
        },
    )
    mask_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed for random masks; defaults to TrainingArguments.seed (or 0 outside the Trainer)."
        },
    )
    optimizer: str = field(
        default="auto",
        metadata={
            "help": "'auto' (the default): SparseAdamW when TrainingArguments.optim is the Trainer's default "
            "AdamW, else the optimizer chosen there. 'sparse_adamw': AdamW whose state lives only on unmasked "
            "entries, with per-entry bias correction. 'trainer': whatever TrainingArguments.optim builds (or the "
            "optimizer passed to the Trainer); weight decay is then applied to unmasked entries only."
        },
    )
    fisher_samples: int = field(
        default=1024, metadata={"help": "Training samples used to estimate the Fisher information ('fish')."}
    )
    low_memory: bool = field(
        default=False,
        metadata={
            "help": "Score each gradient as soon as backward completes it and free it at once, so dense "
            "gradients never coexist; a table tied to the output layer is scored in blocks and never built "
            "whole. Needs gradient_accumulation_steps=1, no fp16 loss scaling, and clipping through the "
            "engine (ID3Trainer's); otherwise falls back to the standard mode with a warning."
        },
    )
    sparse_embedding_grads: bool | None = field(
        default=None,
        metadata={
            "help": "Give large float32 embedding tables a row-sparse gradient: backward writes only the rows "
            "of the batch's tokens instead of a zero-filled table (bitwise the same values on CPU); in "
            "low-memory mode, tables tied to the output layer too. None: on under ID3Trainer and in "
            "low-memory mode wherever it applies; otherwise off in a plain loop, where torch's "
            "clip_grad_norm_ cannot read it (use engine.clip_grad_norm_). Needs SparseAdamW (see optimizer); "
            "not with fp16 loss scaling, DDP, or methods 'repeat' and 'full'."
        },
    )
    recompute_pointwise: bool | None = field(
        default=None,
        metadata={
            "help": "Store a saved activation that is a product or SiLU/GELU of tensors autograd keeps anyway "
            "(normed hidden states, the MLP's activation) as that one op, and redo it in backward: every "
            "weight's gradient needs its input, and this stops keeping the cheapest of them. Gradients are "
            "bitwise unchanged; any model. None: on in low-memory mode and wherever the bounded weight-gradient "
            "path runs (weight_grads), off otherwise."
        },
    )
    weight_grads: str = field(
        default="auto",
        metadata={
            "help": "'bounded': selectable nn.Linear / Conv1D weights get no dense gradient; backward bounds the "
            "D3 scores from token-group norms, computes exact scores only where the bound reaches the cut and "
            "exact gradients at unmasked entries (the same selection up to fp32 rounding ties; see "
            "id3_callback/bounded.py). Needs method='id3', optimizer='sparse_adamw', "
            "gradient_accumulation_steps=1, no fp16 loss scaling, no DDP, clipping through the engine and "
            "low_memory=False; otherwise dense, with a warning. 'dense': backward computes every selectable "
            "weight's gradient (autograd's own). 'auto' (default): 'bounded' where it is the faster one, i.e. "
            "where 'bounded' applies, under ID3Trainer (which tells the engine about accumulation and "
            "clipping), with the weights on the CPU and its native kernels built, and not under torch.compile; "
            "'dense' elsewhere, the reason in the plan's summary and no warning."
        },
    )
    bounded_gemm_tokens: int | None = field(
        default=None,
        metadata={
            "help": "weight_grads='bounded': a layer with at most this many live tokens in a step is scored from "
            "GEMM rows over them, one with more by the bound (both exact; they differ in cost). None (default): "
            "each layer's choice is measured on this machine over the first 4 scoring steps, then fixed and "
            "saved with the state. Set it to make runs bitwise reproducible across machines."
        },
    )
    consistency_check_steps: int = field(
        default=100,
        metadata={
            "help": "Under DDP, compare a hash of the unmasked set across ranks every N steps (0: never)."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise ValueError(
                f"budget must be a number (got {self.budget!r}): a count such as budget=100000 or a fraction such as "
                "budget=0.0017."
            )
        if self.budget is None or not math.isfinite(float(self.budget)) or self.budget <= 0:
            raise ValueError(
                f"budget must be > 0 (got {self.budget}): pass a count such as budget=100000 or a fraction such "
                "as budget=0.0017."
            )
        if self.budget >= 1 and float(self.budget) != int(self.budget):
            raise ValueError(
                f"budget {self.budget} is neither a count nor a fraction: use an integer >= 1 or a float in (0, 1)."
            )
        for name in ("eps", "exp"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(
                    f"eps and exp must be >= 0 and finite numbers (got {name}={value!r}); the defaults are "
                    "eps=1e-3, exp=1.0."
                )
        if self.exp > 0 and self.eps == 0:
            raise ValueError("eps=0 with exp>0 divides by zero for zero weights: use eps > 0 (default 1e-3).")
        if self.exp > MAX_EXP:
            raise ValueError(
                f"exp={self.exp} is outside the supported 0..{MAX_EXP:g}: the paper uses 0 to 2."
            )
        if self.exp > 0 and self.exp * math.log10(self.eps) < _FLOAT32_TINY_LOG10:
            raise ValueError(
                f"eps={self.eps:g} with exp={self.exp:g}: eps**exp underflows float32, so D3 scores of small weights "
                "become infinite and are never chosen. Lower exp or raise eps."
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r}).")
        if self.weight_grads not in ("auto", "dense", "bounded"):
            raise ValueError(
                f"weight_grads must be 'auto', 'dense' or 'bounded' (got {self.weight_grads!r})."
            )
        if self.bounded_gemm_tokens is not None and (
            isinstance(self.bounded_gemm_tokens, bool)
            or not isinstance(self.bounded_gemm_tokens, int)
            or self.bounded_gemm_tokens < 0
        ):
            raise ValueError(
                f"bounded_gemm_tokens must be None (measured) or an integer >= 0 (got "
                f"{self.bounded_gemm_tokens!r}): 0 scores every layer by the bound."
            )
        if self.fisher_samples < 1:
            raise ValueError(f"fisher_samples must be >= 1 (got {self.fisher_samples}).")

    def resolve_budget(self, selectable: int) -> int:
        """The budget as a count of entries, clamped to `selectable` (with a warning)."""
        if self.budget < 1:
            count = max(1, round(self.budget * selectable))
        else:
            count = int(self.budget)
        if count > selectable:
            warnings.warn(
                f"budget {count:,} exceeds the {selectable:,} selectable entries: all of them will be unmasked. "
                "Lower `budget` or widen `include` to make the budget bind.",
                stacklevel=2,
            )
            count = selectable
        return count

    def to_dict(self) -> dict:
        return asdict(self)
