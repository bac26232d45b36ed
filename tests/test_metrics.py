"""The local evaluate metric modules against values computed directly with sklearn/scipy/rouge_score."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rouge_score import rouge_scorer
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from id3_callback.metrics import AVAILABLE_METRICS, load_metric, metric_path
from id3_callback.metrics.gsm8k.gsm8k import extract_prediction, extract_reference, normalize_number

REPO_ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("metric_cache"))


@pytest.mark.parametrize("name", AVAILABLE_METRICS)
def test_metric_path_is_absolute_module_file(name: str) -> None:
    path = Path(metric_path(name))
    assert path.is_absolute() and path.is_file() and path.name == f"{name}.py"
    assert (path.parent / "__init__.py").is_file()  # so `packages = find:` ships the folder


def test_metric_path_unknown_name() -> None:
    with pytest.raises(FileNotFoundError, match="available"):
        metric_path("bleu")


def test_glue_cola_matches_sklearn(cache_dir: str) -> None:
    preds, refs = [1, 0, 1, 1, 0, 1, 0], [1, 0, 0, 1, 1, 1, 0]
    result = load_metric("glue", "cola", cache_dir=cache_dir).compute(predictions=preds, references=refs)
    assert result == {"matthews_correlation": pytest.approx(matthews_corrcoef(refs, preds))}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_glue_accuracy_and_f1(task: str, cache_dir: str) -> None:
    preds, refs = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    result = load_metric("glue", task, cache_dir=cache_dir).compute(predictions=preds, references=refs)
    assert result == {"accuracy": pytest.approx(0.6), "f1": pytest.approx(f1_score(refs, preds))}


@pytest.mark.parametrize(
    "task", ["sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans"]
)
def test_glue_accuracy_tasks(task: str, cache_dir: str) -> None:
    result = load_metric("glue", task, cache_dir=cache_dir).compute(
        predictions=[0, 2, 1, 1], references=[0, 1, 1, 1]
    )
    assert result == {"accuracy": pytest.approx(0.75)}


def test_glue_stsb_correlations(cache_dir: str) -> None:
    preds, refs = [0.5, 2.0, 3.1, 4.9, 1.0], [1.0, 2.5, 3.0, 4.0, 0.2]
    result = load_metric("glue", "stsb", cache_dir=cache_dir).compute(predictions=preds, references=refs)
    assert result["pearson"] == pytest.approx(pearsonr(preds, refs)[0], rel=1e-5)
    assert result["spearmanr"] == pytest.approx(spearmanr(preds, refs)[0], rel=1e-5)


def test_glue_unknown_config(cache_dir: str) -> None:
    with pytest.raises(KeyError, match="Unknown GLUE config"):
        load_metric("glue", "squad", cache_dir=cache_dir)


def test_rouge_matches_rouge_score_mean(cache_dir: str) -> None:
    preds = ["the cat sat on the mat\nit was happy", "dogs are running fast"]
    refs = ["a cat sat on a mat\nthe cat was happy", "the dog runs quickly"]
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    rouge = load_metric("rouge", cache_dir=cache_dir)
    for stem in (False, True):
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=stem)
        direct = [scorer.score(r, p) for p, r in zip(preds, refs)]
        result = rouge.compute(predictions=preds, references=refs, use_stemmer=stem)
        assert set(result) == set(types)
        for t in types:
            assert result[t] == pytest.approx(sum(s[t].fmeasure for s in direct) / len(direct))
    # The newlines make rougeLsum (sentence-level LCS) differ from rougeL here, so the split is exercised.
    assert result["rougeLsum"] != pytest.approx(result["rougeL"])


def test_rouge_tiny_by_hand(cache_dir: str) -> None:
    # unigram P = 3/3, R = 3/4 -> F = 6/7; bigram P = 2/2, R = 2/3 -> F = 0.8
    result = load_metric("rouge", cache_dir=cache_dir).compute(
        predictions=["the cat sat"], references=["the cat sat down"]
    )
    assert result["rouge1"] == pytest.approx(6 / 7) and result["rouge2"] == pytest.approx(0.8)


def test_rouge_multi_reference_and_no_aggregation(cache_dir: str) -> None:
    rouge = load_metric("rouge", cache_dir=cache_dir)
    result = rouge.compute(
        predictions=["the cat sat", "hello world"],
        references=[["nothing alike", "the cat sat"], ["hello there", "world"]],
        rouge_types=["rouge1"],
        use_aggregator=False,
    )
    assert result["rouge1"][0] == pytest.approx(1.0)
    assert result["rouge1"][1] == pytest.approx(2 / 3)  # best of 0.5 and 2/3


@pytest.mark.parametrize(
    ("text", "value"),
    [("1,000", 1000.0), ("1000.0", 1000.0), ("$1000.", 1000.0), ("-$5", -5.0), ("0.50", 0.5), ("abc", None)],
)
def test_gsm8k_normalize_number(text: str, value: float | None) -> None:
    assert normalize_number(text) == value


@pytest.mark.parametrize(
    ("prediction", "value"),
    [
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", 72.0),
        ("#### $1,080.", 1080.0),
        ("The answer is 18 dollars.", 18.0),  # no marker: last number
        ("I think 3 then 4.5", 4.5),
        ("#### 7\n\nQuestion: 9 apples... #### 9", 7.0),  # first marker wins over run-on generations
        ("no numbers here", None),
        ("#### unknown, maybe 12", 12.0),
    ],
)
def test_gsm8k_extract_prediction(prediction: str, value: float | None) -> None:
    assert extract_prediction(prediction) == value


def test_gsm8k_metric_accuracy(cache_dir: str) -> None:
    refs = ["2 * 500 = <<2*500=1000>>1000\n#### 1,000", "#### 72", "#### -3", "#### 0.5"]
    preds = ["so 1000.0 in total", "#### 72.", "the result is -3", "#### 0.25"]
    result = load_metric("gsm8k", cache_dir=cache_dir).compute(predictions=preds, references=refs)
    assert result == {"accuracy": pytest.approx(0.75)}


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason="shared GSM8K data not present")
def test_gsm8k_real_references_all_parse(cache_dir: str) -> None:
    import json

    answers = [json.loads(line)["answer"] for line in (GSM8K_DIR / "test.jsonl").read_text().splitlines()]
    assert all(extract_reference(a) is not None for a in answers)
    result = load_metric("gsm8k", cache_dir=cache_dir).compute(predictions=answers, references=answers)
    assert result == {"accuracy": 1.0}


def test_metrics_load_offline_with_fresh_hf_home(tmp_path: Path) -> None:
    """evaluate copies each module into $HF_HOME/modules; that must work offline from an empty cache."""
    script = (
        "import evaluate\n"
        "from id3_callback.metrics import metric_path\n"
        "print(evaluate.load(metric_path('glue'), 'sst2').compute(predictions=[1, 0], references=[1, 1]))\n"
        "rouge = evaluate.load(metric_path('rouge'))\n"
        "print(rouge.compute(predictions=['a b'], references=['a b'])['rouge1'])\n"
        "print(evaluate.load(metric_path('gsm8k')).compute(predictions=['#### 3'], references=['#### 3']))\n"
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["{'accuracy': 0.5}", "1.0", "{'accuracy': 1.0}"]
    assert (tmp_path / "hf_home" / "modules").is_dir()
