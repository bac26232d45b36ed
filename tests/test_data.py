"""Dataset loaders on tiny GLUE_DIR-style folders written here, plus the real shared data when present."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from id3_callback import data
from id3_callback.data import (
    GLUE_LABEL_NAMES,
    GLUE_TASKS,
    eval_split_names,
    load_glue,
    load_gsm8k,
    load_summarization,
    read_tsv,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_tsv(path: Path, rows: list[list[str]], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join("\t".join(row) for row in rows) + "\n"
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")


@pytest.fixture(autouse=True)
def no_glue_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLUE_DIR", raising=False)


@pytest.fixture
def glue_dir(tmp_path: Path) -> Path:
    root = tmp_path / "glue"
    # SST-2: an unbalanced quote must not swallow the following lines.
    write_tsv(root / "SST-2/train.tsv", [["sentence", "label"], ['a " quoted start ', "1"], ["dull", "0"]])
    write_tsv(root / "SST-2/dev.tsv", [["sentence", "label"], ["fine film", "1"]])
    write_tsv(root / "SST-2/test.tsv", [["index", "sentence"], ["0", "unknown"]])
    # CoLA: no header in train/dev; test has one.
    write_tsv(
        root / "CoLA/train.tsv", [["gj04", "1", "", "The cat sat."], ["gj04", "0", "*", "Cat the sat."]]
    )
    write_tsv(root / "CoLA/dev.tsv", [["cj99", "0", "*", 'He said "hi.']])
    write_tsv(root / "CoLA/test.tsv", [["index", "sentence"], ["0", "A test."]])
    mrpc_header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    write_tsv(root / "MRPC/train.tsv", [mrpc_header, ["1", "1", "2", "He left.", '"He went away.']], bom=True)
    write_tsv(root / "MRPC/dev.tsv", [mrpc_header, ["0", "3", "4", "Yes.", "No."]], bom=True)
    rte_header = ["index", "sentence1", "sentence2", "label"]
    write_tsv(
        root / "RTE/train.tsv",
        [rte_header, ["0", "A b.", "A.", "entailment"], ["1", "C.", "D.", "not_entailment"]],
    )
    write_tsv(root / "RTE/dev.tsv", [rte_header, ["0", "E.", "F.", "not_entailment"]])
    stsb_header = "index genre filename year old_index source1 source2 sentence1 sentence2".split()
    write_tsv(
        root / "STS-B/train.tsv",
        [[*stsb_header, "score"], ["0", "g", "f", "y", "0", "s", "s", "A.", "B.", "3.8"]],
    )
    write_tsv(
        root / "STS-B/dev.tsv",
        [[*stsb_header, "score"], ["0", "g", "f", "y", "0", "s", "s", "C.", "D.", "0.25"]],
    )
    write_tsv(root / "STS-B/test.tsv", [stsb_header, ["0", "g", "f", "y", "0", "s", "s", "E.", "F."]])
    parses = ["p1", "p2", "p3", "p4"]
    mnli_train = [
        "index",
        "promptID",
        "pairID",
        "genre",
        *parses,
        "sentence1",
        "sentence2",
        "label1",
        "gold_label",
    ]
    write_tsv(
        root / "MNLI/train.tsv",
        [
            mnli_train,
            ["0", "1", "1e", "gov", *parses, "P.", "H.", "neutral", "neutral"],
            ["1", "only three", "x"],
        ],
    )
    mnli_dev = [*mnli_train[:10], "label1", "label2", "label3", "label4", "label5", "gold_label"]
    contradiction = [
        "0",
        "2",
        "2c",
        "fiction",
        *parses,
        "P2.",
        "H2.",
        *["contradiction"] * 5,
        "contradiction",
    ]
    write_tsv(root / "MNLI/dev_matched.tsv", [mnli_dev, contradiction])
    write_tsv(root / "MNLI/dev_mismatched.tsv", [mnli_dev, [*contradiction[:-1], "entailment"]])
    qqp_header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write_tsv(root / "QQP/train.tsv", [qqp_header, ["0", "1", "2", "Why?", "How?", "0"], ["1", "broken row"]])
    write_tsv(root / "QQP/dev.tsv", [qqp_header, ["0", "1", "2", "What?", "What?", "1"]])
    write_tsv(
        root / "QNLI/dev.tsv", [["index", "question", "sentence", "label"], ["0", "Q?", "S.", "entailment"]]
    )
    return root


def as_rows(ds: Dataset) -> list[dict]:
    return [dict(row) for row in ds]


def test_glue_tasks_table() -> None:
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    s1, s2, num_labels, metric, val = GLUE_TASKS["mnli"]
    assert (s1, s2, num_labels, metric, val) == (
        "sentence1",
        "sentence2",
        3,
        "mnli",
        ("validation_matched", "validation_mismatched"),
    )
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["sst2"].sentence2_key is None
    assert all(
        GLUE_LABEL_NAMES[t] is None or len(GLUE_LABEL_NAMES[t]) == s.num_labels for t, s in GLUE_TASKS.items()
    )


def test_sst2_quotes_and_test_split(glue_dir: Path) -> None:
    ds = load_glue("sst2", glue_dir=glue_dir)
    assert set(ds) == {"train", "validation", "test"}
    assert as_rows(ds["train"]) == [
        {"sentence1": 'a " quoted start ', "label": 1},
        {"sentence1": "dull", "label": 0},
    ]
    assert as_rows(ds["test"]) == [{"sentence1": "unknown", "label": -1}]
    assert ds["train"].features["label"].names == ["negative", "positive"]


def test_cola_without_header(glue_dir: Path) -> None:
    ds = load_glue("cola", glue_dir=glue_dir)
    assert as_rows(ds["train"]) == [
        {"sentence1": "The cat sat.", "label": 1},
        {"sentence1": "Cat the sat.", "label": 0},
    ]
    assert as_rows(ds["validation"]) == [{"sentence1": 'He said "hi.', "label": 0}]
    assert as_rows(ds["test"]) == [{"sentence1": "A test.", "label": -1}]


def test_mrpc_bom_header(glue_dir: Path) -> None:
    ds = load_glue("mrpc", glue_dir=glue_dir)
    assert as_rows(ds["train"]) == [{"sentence1": "He left.", "sentence2": '"He went away.', "label": 1}]
    assert "test" not in ds


def test_rte_string_labels_match_hub_ids(glue_dir: Path) -> None:
    ds = load_glue("rte", glue_dir=glue_dir)
    assert ds["train"]["label"] == [0, 1] and ds["validation"]["label"] == [1]
    assert ds["train"].column_names == ["sentence1", "sentence2", "label"]


def test_stsb_float_labels(glue_dir: Path) -> None:
    ds = load_glue("stsb", glue_dir=glue_dir)
    assert ds["train"]["label"] == [pytest.approx(3.8)] and ds["validation"]["label"] == [0.25]
    assert ds["test"]["label"] == [-1.0]
    assert ds["train"].features["label"].dtype == "float32"


def test_mnli_matched_mismatched(glue_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="id3_callback.data"):
        ds = load_glue("mnli", glue_dir=glue_dir)
    assert set(ds) == {"train", "validation_matched", "validation_mismatched"}
    assert as_rows(ds["train"]) == [{"sentence1": "P.", "sentence2": "H.", "label": 1}]
    assert ds["validation_matched"]["label"] == [2] and ds["validation_mismatched"]["label"] == [0]
    assert "skipped 1 malformed rows" in caplog.text
    assert eval_split_names("mnli", ds) == ["validation_matched", "validation_mismatched"]


def test_qqp_skips_malformed_rows(glue_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="id3_callback.data"):
        ds = load_glue("qqp", glue_dir=glue_dir)
    assert as_rows(ds["train"]) == [{"sentence1": "Why?", "sentence2": "How?", "label": 0}]
    assert "train.tsv: skipped 1 malformed rows" in caplog.text


def test_glue_dir_from_env_and_task_folder(glue_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLUE_DIR", str(glue_dir))
    assert load_glue("rte")["train"].num_rows == 2
    assert load_glue("rte", glue_dir=glue_dir / "RTE")["train"].num_rows == 2


def test_missing_folder_and_files_explain_the_fix(glue_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="WNLI.*GLUE_DIR"):
        load_glue("wnli", glue_dir=glue_dir)
    with pytest.raises(FileNotFoundError, match="GLUE_DIR"):
        load_glue("rte", glue_dir=glue_dir / "nowhere")
    # A relative folder (the demo's ../shared/data/glue) is named as resolved, since it depends on the cwd.
    relative = Path("nowhere", "glue")
    with pytest.raises(FileNotFoundError, match="resolved from the working directory: .*nowhere.glue.*wins"):
        load_glue("rte", glue_dir=relative)
    with pytest.raises(FileNotFoundError, match=r"QNLI/train\.tsv.*splits="):
        load_glue("qnli", glue_dir=glue_dir)
    assert load_glue("qnli", glue_dir=glue_dir, splits=["validation"])["validation"]["label"] == [0]
    with pytest.raises(ValueError, match="Unknown GLUE task"):
        load_glue("squad", glue_dir=glue_dir)


def test_train_and_validation_files(tmp_path: Path, glue_dir: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text('premise,hypothesis,label\n"A, b.",C.,contradiction\nD.,E.,1\n', encoding="utf-8")
    valid = tmp_path / "dev.jsonl"
    valid.write_text(json.dumps({"sentence1": "F.", "sentence2": "G.", "label": 0}) + "\n", encoding="utf-8")
    ds = load_glue("mnli", train_file=train, validation_file=valid)
    assert as_rows(ds["train"]) == [
        {"sentence1": "A, b.", "sentence2": "C.", "label": 2},
        {"sentence1": "D.", "sentence2": "E.", "label": 1},
    ]
    assert eval_split_names("mnli", ds) == ["validation"]
    only_dev = load_glue("sst2", validation_file=glue_dir / "SST-2/dev.tsv")
    assert list(only_dev) == ["validation"] and only_dev["validation"]["label"] == [1]


def test_hub_fallback_renames_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = DatasetDict(
        {"validation": Dataset.from_dict({"question": ["Q?"], "sentence": ["S."], "label": [1], "idx": [0]})}
    )
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: hub)
    ds = load_glue("qnli")
    assert as_rows(ds["validation"]) == [{"sentence1": "Q?", "sentence2": "S.", "label": 1}]


def test_hub_failure_is_file_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(data, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="set --glue_dir or GLUE_DIR"):
        load_glue("sst2")


def test_read_tsv_counts_malformed(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    write_tsv(path, [["a", "b"], ["1", "2"], ["3"], ["4", "5", "6"]])
    assert read_tsv(path) == ([["a", "b"], ["1", "2"]], 2)


def test_summarization_data_dir_and_files(tmp_path: Path) -> None:
    rows = [{"id": "1", "document": "Doc one.\nMore.", "summary": "One."}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (tmp_path / "validation.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    ds = load_summarization(data_dir=tmp_path)
    assert set(ds) == {"train", "validation"} and as_rows(ds["train"]) == rows

    cnn = tmp_path / "cnn.json"
    cnn.write_text(json.dumps([{"article": "Art.", "highlights": "Hi.", "extra": 1}]), encoding="utf-8")
    ds = load_summarization(train_file=cnn)
    assert as_rows(ds["train"]) == [{"document": "Art.", "summary": "Hi."}]

    with pytest.raises(FileNotFoundError, match="No data files"):
        load_summarization(data_dir=tmp_path / "empty_does_not_exist")
    with pytest.raises(ValueError, match="needs"):
        load_summarization()


def test_gsm8k_data_dir(tmp_path: Path) -> None:
    row = {"question": "1+1?", "answer": "1+1=2\n#### 2"}
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    ds = load_gsm8k(tmp_path)
    assert set(ds) == {"train", "test"} and as_rows(ds["test"]) == [row]
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="test"):
        load_gsm8k(tmp_path)


@pytest.mark.skipif(not (SHARED_DATA / "glue" / "RTE").is_dir(), reason="shared GLUE RTE data not present")
def test_real_rte() -> None:
    ds = load_glue("rte", glue_dir=SHARED_DATA / "glue")
    assert (ds["train"].num_rows, ds["validation"].num_rows, ds["test"].num_rows) == (2490, 277, 3000)
    assert set(ds["train"]["label"]) == {0, 1} and set(ds["test"]["label"]) == {-1}
    first = ds["validation"][0]
    assert (
        first["sentence2"] == "Christopher Reeve had an accident." and first["label"] == 1
    )  # not_entailment


@pytest.mark.skipif(not (SHARED_DATA / "xsum").is_dir(), reason="shared XSum data not present")
def test_real_xsum_and_gsm8k() -> None:
    xsum = load_summarization(data_dir=SHARED_DATA / "xsum")
    assert (xsum["train"].num_rows, xsum["validation"].num_rows) == (700, 100)
    gsm8k = load_gsm8k(SHARED_DATA / "gsm8k")
    assert (gsm8k["train"].num_rows, gsm8k["test"].num_rows) == (7473, 1319)
    assert gsm8k["train"][0]["answer"].endswith("#### 72")
