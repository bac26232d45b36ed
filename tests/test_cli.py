"""The `id3` command line: inspect, merge, heatmap, diff, and one-line errors."""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from helpers import token_batches as batches

from id3_callback import ID3Config, ID3Engine, SparseAdamW, save_delta
from id3_callback.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def train_delta(path: Path, budget: int, seed: int = 0, steps: int = 3, model=None):
    """A tiny Llama trained with ID3 in a plain loop; returns (base state, trained model, delta path)."""
    model = tiny_llama() if model is None else model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    engine = ID3Engine(model, ID3Config(budget=budget))
    engine.start(total_steps=steps)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2)
    for batch in batches("lm", steps, seed=seed):
        model(**batch).loss.backward()
        engine.step()
        opt.step()
        opt.zero_grad()
    return base, model, save_delta(engine, path)


@pytest.fixture
def base_dir(tmp_path):
    folder = tmp_path / "base"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def trained(tmp_path):
    return train_delta(tmp_path / "a.delta.safetensors", budget=300)


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # only what the command prints
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_text_and_json(trained, base_dir, capsys):
    _, model, path = trained
    code, text, _ = run(capsys, "inspect", path)
    assert code == 0 and "selected    300 entries" in text and "checksum" in text
    code, out, _ = run(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert info["selected_entries"] == 300 and info["dense_entries"] == 0
    assert (
        info["tensors"] == len(info["per_tensor"]) and sum(r["unmasked"] for r in info["per_tensor"]) == 300
    )
    assert info["bytes_per_entry"] == pytest.approx(Path(path).stat().st_size / 300)
    assert info["grid"]["value"] == "share_of_selected"
    shares = [v for row in info["grid"]["values"] for v in row if v is not None]
    assert sum(shares) == pytest.approx(1.0) and sum(map(sum, info["grid"]["selected"])) == 300
    # with the base: densities over every trainable tensor, delta or not
    code, out, _ = run(capsys, "inspect", path, "--base", base_dir, "--json")
    info = json.loads(out)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert {r["name"] for r in info["per_tensor"]} == set(sizes)
    for r in info["per_tensor"]:
        assert r["numel"] == sizes[r["name"]] and r["density"] == pytest.approx(r["unmasked"] / r["numel"])
    assert info["grid"]["value"] == "density"


def test_merge_is_bitwise_the_fine_tuned_model_and_copies_the_tokenizer(trained, base_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, model, path = trained
    out = tmp_path / "merged"
    code, _, err = run(capsys, "merge", base_dir, path, out)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(model.state_dict().items(), merged.state_dict().values()):
        assert torch.equal(a, b), name
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w3 w7")["input_ids"] == tiny_tokenizer()("w3 w7")["input_ids"]
    # the output folder is never overwritten
    code, _, err = run(capsys, "merge", base_dir, path, out)
    assert code == 1 and "exists" in err


def write_tiny_gguf(path: Path) -> None:
    """A float32 GGUF file of a 2-layer Llama (vocab 100) with a small llama-style tokenizer."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    rng = np.random.default_rng(0)
    hidden, ffn, layers, heads, kv_heads, vocab = 32, 48, 2, 2, 1, 100
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")  # transformers 4.48 reads general.name
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def add(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    add("token_embd.weight", vocab, hidden)
    add("output.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, shape in (
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv_heads * head_dim, hidden)),
            ("attn_v", (kv_heads * head_dim, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ffn, hidden)),
            ("ffn_up", (ffn, hidden)),
            ("ffn_down", (hidden, ffn)),
        ):
            add(f"blk.{i}.{name}.weight", *shape)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_merge_materialises_a_gguf_base(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from id3_callback.models import load_plain_model

    gguf_path = tmp_path / "gguf" / "tiny.gguf"
    gguf_path.parent.mkdir()
    write_tiny_gguf(gguf_path)
    _, model, path = train_delta(
        tmp_path / "g.delta.safetensors", budget=300, model=load_plain_model(gguf_path)
    )
    out = tmp_path / "merged"
    code, _, err = run(capsys, "merge", gguf_path, path, out)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(model.state_dict().items(), merged.state_dict().values()):
        assert torch.equal(a, b), name
    assert (out / "tokenizer_config.json").is_file()  # the GGUF's tokenizer, saved beside the weights


def test_merge_refuses_another_base_in_one_line_and_writes_nothing(trained, tmp_path, capsys):
    _, _, path = trained
    other = tmp_path / "other"
    torch.manual_seed(1)
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_llama().config).save_pretrained(other)  # same shapes, other values
    code, out, err = run(capsys, "merge", other, path, tmp_path / "merged")
    assert code == 1 and err.count("\n") == 1 and "checksum mismatch" in err
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temp folder left


def test_heatmap_png(trained, base_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, _, path = trained
    for extra in ([], ["--base", base_dir]):
        png = tmp_path / f"mask{len(extra)}.png"
        code, out, err = run(capsys, "heatmap", path, "-o", png, *extra)
        assert code == 0, err
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diff_counts_shared_entries_per_tensor(tmp_path, capsys):
    from id3_callback import load_delta

    _, _, a = train_delta(tmp_path / "a.safetensors", budget=300, seed=0)
    _, _, b = train_delta(tmp_path / "b.safetensors", budget=200, seed=1)
    code, out, _ = run(capsys, "diff", a, b, "--json")
    info = json.loads(out)
    da, db = load_delta(a), load_delta(b)
    shared = 0
    for row in info["per_tensor"]:
        ia = set(da.sparse[row["name"]][0].tolist()) if row["name"] in da.sparse else set()
        ib = set(db.sparse[row["name"]][0].tolist()) if row["name"] in db.sparse else set()
        assert (row["a"], row["b"], row["shared"]) == (len(ia), len(ib), len(ia & ib))
        union = len(ia | ib)
        assert row["jaccard"] == pytest.approx(len(ia & ib) / union if union else 1.0)
        shared += len(ia & ib)
    assert info["entries_a"] == 300 and info["entries_b"] == 200 and info["shared"] == shared
    assert 0 < info["jaccard"] < 1 and info["base_model_a"] == info["base_model_b"]
    code, text, _ = run(capsys, "diff", a, a)
    assert code == 0 and text.strip().splitlines()[-1].endswith("1.000")


@pytest.mark.parametrize("damage", ["missing", "flipped", "not_safetensors"])
def test_errors_are_one_line(trained, tmp_path, capsys, damage):
    _, _, path = trained
    bad = tmp_path / "bad.safetensors"
    if damage == "flipped":
        data = bytearray(Path(path).read_bytes())
        data[-3] ^= 0xFF  # inside the last tensor's bytes
        bad.write_bytes(bytes(data))
    elif damage == "not_safetensors":
        bad.write_text("hello")
    commands = (["inspect", bad], ["diff", bad, path], ["heatmap", bad, "-o", tmp_path / "x.png"])
    for command in commands + (["merge", tmp_path, bad, tmp_path / "out"],):
        code, out, err = run(capsys, *command)
        assert code == 1 and err.count("\n") == 1 and err.startswith(f"id3 {command[0]}: error:"), err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "out").exists()


def test_the_process_exits_1_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "id3_callback.cli", "inspect", str(tmp_path / "missing.safetensors")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == f"id3 inspect: error: no delta file at {tmp_path / 'missing.safetensors'}\n"


def test_console_script_is_declared():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    assert "id3 = id3_callback.cli:main" in [s.strip() for s in scripts]
