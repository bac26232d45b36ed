"""Dataset loading helpers for the example scripts: GLUE, summarization (XSum-style) and GSM8K.

Every loader reads local files when given a path (the hub is unreachable on offline machines) and falls
back to the Hugging Face hub otherwise. GLUE data is normalised to the columns `sentence1`, optional
`sentence2` and `label`, with the same label ids as the hub's `nyu-mll/glue` dataset, whatever the source.

Example:
    >>> from id3_callback.data import GLUE_TASKS, load_glue
    >>> ds = load_glue("rte", glue_dir="../shared/data/glue")
    >>> ds["train"].column_names, GLUE_TASKS["rte"].num_labels
    (['sentence1', 'sentence2', 'label'], 2)
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

try:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
except ImportError as err:  # the library itself does not need `datasets`; the example scripts do
    raise ImportError(
        "id3_callback.data (the example scripts' dataset loaders) needs `datasets`: "
        "pip install 'id3-callback[examples]'"
    ) from err

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Some GLUE sentences (QQP, MNLI) are longer than csv's default 128 KiB field limit.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class GlueTask(NamedTuple):
    """What a script needs to know about one GLUE task, after `load_glue`'s normalisation."""

    sentence1_key: str
    sentence2_key: str | None
    num_labels: int  # 1 means regression (stsb)
    metric_config: str  # config name for the local `glue` metric
    validation_splits: tuple[str, ...]


_PAIR = ("sentence1", "sentence2")
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("sentence1", None, 2, "cola", ("validation",)),
    "sst2": GlueTask("sentence1", None, 2, "sst2", ("validation",)),
    "mrpc": GlueTask(*_PAIR, 2, "mrpc", ("validation",)),
    "qqp": GlueTask(*_PAIR, 2, "qqp", ("validation",)),
    "stsb": GlueTask(*_PAIR, 1, "stsb", ("validation",)),
    "mnli": GlueTask(*_PAIR, 3, "mnli", ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask(*_PAIR, 2, "qnli", ("validation",)),
    "rte": GlueTask(*_PAIR, 2, "rte", ("validation",)),
    "wnli": GlueTask(*_PAIR, 2, "wnli", ("validation",)),
}

# Label names in id order, as in the hub's `nyu-mll/glue`; string labels in files map through these.
GLUE_LABEL_NAMES: dict[str, list[str] | None] = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "stsb": None,
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
}

_GLUE_FOLDERS = {
    "cola": "CoLA",
    "sst2": "SST-2",
    "mrpc": "MRPC",
    "qqp": "QQP",
    "stsb": "STS-B",
    "mnli": "MNLI",
    "qnli": "QNLI",
    "rte": "RTE",
    "wnli": "WNLI",
}

# Column names that may hold sentence1 / sentence2 / label: normalised, classic GLUE tsv, then hub names.
_GLUE_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "cola": (("sentence1", "sentence"), (), ("label",)),
    "sst2": (("sentence1", "sentence"), (), ("label",)),
    "mrpc": (("sentence1", "#1 String"), ("sentence2", "#2 String"), ("label", "Quality")),
    "qqp": (("sentence1", "question1"), ("sentence2", "question2"), ("label", "is_duplicate")),
    "stsb": (("sentence1",), ("sentence2",), ("label", "score")),
    "mnli": (("sentence1", "premise"), ("sentence2", "hypothesis"), ("label", "gold_label")),
    "qnli": (("sentence1", "question"), ("sentence2", "sentence"), ("label",)),
    "rte": (("sentence1",), ("sentence2",), ("label",)),
    "wnli": (("sentence1",), ("sentence2",), ("label",)),
}

_COLA_NO_HEADER = ("source", "label", "mark", "sentence")  # CoLA train/dev.tsv have no header row


def glue_split_files(task: str) -> dict[str, str]:
    """Split name -> file name inside the task's classic GLUE_DIR folder.

    Example:
        >>> glue_split_files("rte")
        {'train': 'train.tsv', 'validation': 'dev.tsv', 'test': 'test.tsv'}
    """
    if task == "mnli":
        return {
            "train": "train.tsv",
            "validation_matched": "dev_matched.tsv",
            "validation_mismatched": "dev_mismatched.tsv",
            "test_matched": "test_matched.tsv",
            "test_mismatched": "test_mismatched.tsv",
        }
    return {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


def glue_features(task: str) -> Features:
    """Features of a normalised GLUE split: string sentences, ClassLabel (float32 for stsb) label.

    Example:
        >>> glue_features("sst2")["label"].names
        ['negative', 'positive']
    """
    spec = _task(task)
    features: dict[str, Any] = {"sentence1": Value("string")}
    if spec.sentence2_key:
        features["sentence2"] = Value("string")
    names = GLUE_LABEL_NAMES[task]
    features["label"] = ClassLabel(names=names) if names else Value("float32")
    return Features(features)


def eval_split_names(task: str, dataset: DatasetDict) -> list[str]:
    """The splits of `dataset` to evaluate `task` on: the task's validation splits, else `validation`.

    `load_glue` names a user-supplied `validation_file` split `validation` even for mnli.

    Example:
        >>> eval_split_names("mnli", load_glue("mnli", glue_dir="glue"))
        ['validation_matched', 'validation_mismatched']
    """
    names = [s for s in _task(task).validation_splits if s in dataset]
    return names or (["validation"] if "validation" in dataset else [])


def read_tsv(path: PathLike, expected_fields: int | None = None) -> tuple[list[list[str]], int]:
    """Rows of a tab-separated file and the number of malformed rows skipped.

    Quotes are plain characters here (`QUOTE_NONE`): GLUE sentences contain unbalanced `"`, which
    would make a quoting-aware reader swallow following lines. A leading UTF-8 BOM (MRPC) is dropped.
    Rows whose field count differs from `expected_fields` (default: the first row's) are skipped.

    Example:
        >>> rows, skipped = read_tsv("glue/SST-2/dev.tsv")
        >>> rows[0], skipped
        (['sentence', 'label'], 0)
    """
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = [row for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    if not rows:
        return [], 0
    width = expected_fields or len(rows[0])
    good = [row for row in rows if len(row) == width]
    return good, len(rows) - len(good)


def load_glue(
    task: str,
    glue_dir: PathLike | None = None,
    train_file: PathLike | None = None,
    validation_file: PathLike | None = None,
    cache_dir: str | None = None,
    *,
    splits: Sequence[str] | None = None,
) -> DatasetDict:
    """Load a GLUE task as a DatasetDict with columns `sentence1`, [`sentence2`], `label`.

    Sources, first match wins: `train_file`/`validation_file` (.tsv, .csv, .json or .jsonl; splits
    `train`/`validation`); `glue_dir` or the `GLUE_DIR` environment variable (classic layout,
    `$GLUE_DIR/SST-2/train.tsv`; test splits are loaded when present, with label -1); the hub's
    `nyu-mll/glue`. From a GLUE dir, `splits` chooses which splits to load (default: train and the
    task's validation splits, which must exist; e.g. `splits=["validation"]` for QNLI without train).

    Example:
        >>> ds = load_glue("sst2", glue_dir="../shared/data/glue")
        >>> ds["validation"][0]["label"], ds["test"][0]["label"]
        (1, -1)
    """
    _task(task)
    if train_file or validation_file:
        files = {"train": train_file, "validation": validation_file}
        return DatasetDict({split: _load_glue_file(task, Path(f)) for split, f in files.items() if f})
    glue_dir = glue_dir or os.environ.get("GLUE_DIR")
    if glue_dir:
        return _load_glue_dir(task, Path(glue_dir), splits)
    return _load_glue_hub(task, cache_dir, splits)


def load_summarization(
    train_file: PathLike | None = None,
    validation_file: PathLike | None = None,
    data_dir: PathLike | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load a summarization dataset as a DatasetDict with columns `document`, `summary` (and `id`).

    Sources, first match wins: `train_file`/`validation_file` (.jsonl, .json or .csv); `data_dir` holding
    `train.jsonl`, `validation.jsonl` and/or `test.jsonl` (the layout of `shared/data/xsum`); the hub
    dataset `dataset_name` (`xsum` -> `EdinburghNLP/xsum`, `cnn_dailymail` -> `abisee/cnn_dailymail`
    3.0.0, whose `article`/`highlights` become `document`/`summary`).

    Example:
        >>> ds = load_summarization(data_dir="../shared/data/xsum")
        >>> ds["train"].num_rows, ds["validation"].column_names
        (700, ['id', 'document', 'summary'])
    """
    if train_file or validation_file:
        files = {"train": train_file, "validation": validation_file}
        return DatasetDict({s: _summarization_split(Path(f)) for s, f in files.items() if f})
    if data_dir:
        found = _find_split_files(
            Path(data_dir), ("train", "validation", "test"), (".jsonl", ".json", ".csv")
        )
        return DatasetDict({split: _summarization_split(path) for split, path in found.items()})
    if dataset_name:
        name, config = _HUB_SUMMARIZATION.get(dataset_name, (dataset_name, dataset_config))
        raw = load_dataset(name, dataset_config or config, cache_dir=cache_dir)
        return DatasetDict({split: _summarization_columns(ds, name) for split, ds in raw.items()})
    raise ValueError("load_summarization needs train_file/validation_file, data_dir or dataset_name")


def load_gsm8k(data_dir: PathLike | None = None, cache_dir: str | None = None) -> DatasetDict:
    """Load GSM8K as a DatasetDict with splits `train`, `test` and columns `question`, `answer`.

    `data_dir` holds `train.jsonl` and `test.jsonl` (the layout of `shared/data/gsm8k`; answers end in
    `#### <number>`). Without `data_dir`, the hub's `openai/gsm8k` (config `main`) is used.

    Example:
        >>> ds = load_gsm8k("../shared/data/gsm8k")
        >>> ds["test"].num_rows, ds["train"][0]["answer"].rsplit("####", 1)[1].strip()
        (1319, '72')
    """
    if data_dir is None:
        raw = load_dataset("openai/gsm8k", "main", cache_dir=cache_dir)
        return DatasetDict({split: raw[split].select_columns(["question", "answer"]) for split in raw})
    found = _find_split_files(Path(data_dir), ("train", "test"), (".jsonl", ".json"), require_all=True)
    out = {}
    for split, path in found.items():
        records = _read_records(path)
        missing = {"question", "answer"} - set(records[0] if records else ())
        if missing:
            raise ValueError(f"{path} lacks GSM8K fields {sorted(missing)}; expected 'question' and 'answer'")
        out[split] = Dataset.from_dict({k: [str(r[k]) for r in records] for k in ("question", "answer")})
    return DatasetDict(out)


# --- GLUE internals ---------------------------------------------------------------------------------------


def _task(task: str) -> GlueTask:
    if task not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[task]


def _task_folder(task: str, glue_dir: Path) -> Path:
    if not glue_dir.is_dir():
        raise FileNotFoundError(
            f"GLUE dir {glue_dir} does not exist (resolved from the working directory: {glue_dir.absolute()}); "
            "set --glue_dir or GLUE_DIR to it (a glue_dir given explicitly, as in a JSON config, wins over "
            "GLUE_DIR)"
        )
    wanted = _GLUE_FOLDERS[task]

    def key(name: str) -> str:  # tolerate "sst2", "STS-B", "sts_b" spellings
        return name.lower().replace("-", "").replace("_", "")

    if key(glue_dir.name) == key(wanted):  # glue_dir already points at the task folder
        return glue_dir
    for child in glue_dir.iterdir():
        if child.is_dir() and key(child.name) == key(wanted):
            return child
    layout = ", ".join(f"{wanted}/{name}" for name in list(glue_split_files(task).values())[:-1])
    raise FileNotFoundError(
        f"No {wanted}/ folder for GLUE task {task!r} in {glue_dir}; set --glue_dir or GLUE_DIR to a folder "
        f"with the classic GLUE layout ({layout}, ...), or pass train_file/validation_file"
    )


def _load_glue_dir(task: str, glue_dir: Path, splits: Sequence[str] | None) -> DatasetDict:
    folder = _task_folder(task, glue_dir)
    files = glue_split_files(task)
    required = list(splits) if splits else ["train", *GLUE_TASKS[task].validation_splits]
    unknown = [s for s in required if s not in files]
    if unknown:
        raise ValueError(f"Unknown split(s) {unknown} for GLUE task {task!r}; known: {list(files)}")
    missing = [str(folder / files[s]) for s in required if not (folder / files[s]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"GLUE task {task!r} is missing {missing}; fix the --glue_dir/GLUE_DIR folder, pass "
            "train_file/validation_file, or load fewer splits with splits=[...]"
        )
    # Test files are optional extras unless asked for: GLUE ships them without labels.
    wanted = required if splits else required + [s for s in files if s.startswith("test")]
    return DatasetDict(
        {s: _load_glue_file(task, folder / files[s]) for s in wanted if (folder / files[s]).is_file()}
    )


def _load_glue_file(task: str, path: Path) -> Dataset:
    if not path.is_file():
        raise FileNotFoundError(f"GLUE {task!r} data file {path} does not exist")
    if path.suffix == ".tsv":
        records, skipped = _read_glue_tsv(task, path)
    else:
        records, skipped = _read_records(path), 0
    data, bad_labels = _normalise_glue(task, records, path)
    if skipped + bad_labels:
        logger.warning(
            "%s: skipped %d malformed rows (%d wrong field count, %d bad label)",
            path,
            skipped + bad_labels,
            skipped,
            bad_labels,
        )
    return Dataset.from_dict(data, features=glue_features(task))


def _read_glue_tsv(task: str, path: Path) -> tuple[list[dict[str, str]], int]:
    rows, skipped = read_tsv(path)
    if not rows:
        return [], skipped
    # CoLA train/dev have no header, CoLA test has "index<TAB>sentence"; everything else has a header.
    if task == "cola" and rows[0][0].lower() not in ("index", "id", "sentence", "sentence1"):
        rows, skipped = read_tsv(path, expected_fields=len(_COLA_NO_HEADER))
        return [dict(zip(_COLA_NO_HEADER, row)) for row in rows], skipped
    header = [h.strip() for h in rows[0]]
    return [dict(zip(header, row)) for row in rows[1:]], skipped


def _pick(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _normalise_glue(task: str, records: list[dict[str, Any]], path: Path) -> tuple[dict[str, list], int]:
    s1_names, s2_names, label_names = _GLUE_COLUMNS[task]
    columns = list(records[0]) if records else []
    s1, s2, label = _pick(columns, s1_names), _pick(columns, s2_names), _pick(columns, label_names)
    if records and (s1 is None or (s2_names and s2 is None)):
        raise ValueError(
            f"{path}: cannot find the {task!r} sentence columns (looked for {s1_names} and {s2_names}) "
            f"in {columns}"
        )
    out: dict[str, list] = {"sentence1": [], "sentence2": [], "label": []}
    bad = 0
    for rec in records:
        try:
            # A missing label column means an unlabelled test split, which the hub marks with -1.
            y = _label_id(task, rec[label]) if label else _label_id(task, -1)
        except (ValueError, TypeError):
            bad += 1
            continue
        out["sentence1"].append(str(rec[s1]))
        out["sentence2"].append(str(rec[s2]) if s2 else None)
        out["label"].append(y)
    if not s2_names:
        del out["sentence2"]
    return out, bad


def _label_id(task: str, value: Any) -> int | float:
    names = GLUE_LABEL_NAMES[task]
    if names is None:  # stsb: similarity score in [0, 5]
        return float(value)
    if isinstance(value, str):
        value = value.strip()
        if value in names:
            return names.index(value)
    as_float = float(value)  # tolerates "1.0" from csv/json exports
    if not as_float.is_integer():
        raise ValueError(f"label {value!r} is not a class id for {task}")
    label = int(as_float)
    if not -1 <= label < len(names):
        raise ValueError(f"label {value!r} out of range for {task}")
    return label


def _load_glue_hub(task: str, cache_dir: str | None, splits: Sequence[str] | None) -> DatasetDict:
    try:
        raw = load_dataset("nyu-mll/glue", task, cache_dir=cache_dir)
    except Exception as err:  # offline machines fail here in several ways; one actionable message for all
        raise FileNotFoundError(
            f"Could not load GLUE task {task!r} from the hub ('nyu-mll/glue': {type(err).__name__}: {err}); "
            "set --glue_dir or GLUE_DIR to a local GLUE folder, or pass train_file/validation_file"
        ) from err
    s1_names, s2_names, _ = _GLUE_COLUMNS[task]
    out = {}
    for split in splits or list(raw):
        ds = raw[split]
        renames = {_pick(ds.column_names, s1_names): "sentence1"}
        if s2_names:
            renames[_pick(ds.column_names, s2_names)] = "sentence2"
        ds = ds.rename_columns({k: v for k, v in renames.items() if k != v})
        out[split] = ds.remove_columns([c for c in ds.column_names if c not in glue_features(task)])
    return DatasetDict(out)


# --- generic file internals -------------------------------------------------------------------------------

_HUB_SUMMARIZATION = {
    "xsum": ("EdinburghNLP/xsum", None),
    "EdinburghNLP/xsum": ("EdinburghNLP/xsum", None),
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0"),
    "abisee/cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0"),
}
_DOCUMENT_COLUMNS = ("document", "article", "text", "dialogue")
_SUMMARY_COLUMNS = ("summary", "highlights", "abstract")


def _find_split_files(
    data_dir: Path, splits: Sequence[str], suffixes: Sequence[str], require_all: bool = False
) -> dict[str, Path]:
    found = {}
    for split in splits:
        path = next(
            (data_dir / f"{split}{s}" for s in suffixes if (data_dir / f"{split}{s}").is_file()), None
        )
        if path is not None:
            found[split] = path
        elif require_all:
            raise FileNotFoundError(f"No {split}{{{','.join(suffixes)}}} in {data_dir}")
    if not found:
        raise FileNotFoundError(
            f"No data files in {data_dir}: looked for {{{','.join(splits)}}}{{{','.join(suffixes)}}}"
        )
    return found


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (list, JSON lines, or {"data": [...]}), .csv or .tsv file as dicts."""
    if path.suffix == ".tsv":
        rows, _ = read_tsv(path)
        return [dict(zip(rows[0], row)) for row in rows[1:]] if rows else []
    if path.suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as fh:
            return list(csv.DictReader(fh))
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # not one JSON document: fall through to JSON lines
        if isinstance(data, list):
            return data
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            return data["data"]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _summarization_split(path: Path) -> Dataset:
    if not path.is_file():
        raise FileNotFoundError(f"Summarization data file {path} does not exist")
    return _summarization_columns(Dataset.from_list(_read_records(path)), str(path))


def _summarization_columns(ds: Dataset, source: str) -> Dataset:
    doc, summ = _pick(ds.column_names, _DOCUMENT_COLUMNS), _pick(ds.column_names, _SUMMARY_COLUMNS)
    if doc is None or summ is None:
        raise ValueError(
            f"{source}: need a document column {_DOCUMENT_COLUMNS} and a summary column {_SUMMARY_COLUMNS}, "
            f"got {ds.column_names}"
        )
    ds = ds.rename_columns({k: v for k, v in {doc: "document", summ: "summary"}.items() if k != v})
    return ds.select_columns([c for c in ("id", "document", "summary") if c in ds.column_names])


__all__ = [
    "GLUE_LABEL_NAMES",
    "GLUE_TASKS",
    "GlueTask",
    "eval_split_names",
    "glue_features",
    "glue_split_files",
    "load_glue",
    "load_gsm8k",
    "load_summarization",
    "read_tsv",
]
