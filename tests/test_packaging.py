"""Lean dependencies: the library runs without the example scripts' packages or matplotlib."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LEAN = """
import logging, sys
for name in ("datasets", "evaluate", "sklearn", "scipy", "matplotlib", "trl"):
    sys.modules[name] = None  # import raises, find_spec says absent: as if not installed
sys.path.insert(0, "tests")
import torch
from helpers import MLP, mlp_data, training_args
from id3_callback import ID3Callback, ID3Config, ID3Trainer, apply_delta, save_delta
import id3_callback.cli
from id3_callback import *  # noqa: F403 (every name in __all__ resolves without trl)
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("id3_callback").addHandler(handler)
for run in range(2):
    trainer = ID3Trainer(model=MLP(), args=training_args(__import__("pathlib").Path(sys.argv[1]) / str(run)),
                         train_dataset=mlp_data(), callbacks=[ID3Callback(ID3Config(budget=10))])
    trainer.train()
    save_delta(trainer, sys.argv[1] + "/d.safetensors")
warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING and "matplotlib" in r.getMessage()]
print(len(warnings), warnings[0] if warnings else "")
try:
    import id3_callback.data
except ImportError as err:
    print(err)
"""


def test_library_runs_without_the_examples_extra_or_matplotlib(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", LEAN, str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, *rest = proc.stdout.strip().splitlines()[-2].split(" ", 1)
    assert count == "1" and "pip install 'id3-callback[plots]'" in rest[0]  # once, naming the extra
    assert "pip install 'id3-callback[examples]'" in proc.stdout.strip().splitlines()[-1]
    assert (tmp_path / "d.safetensors").is_file()


def _requirements(text: str) -> set[str]:
    return {re.split(r"[<>=!\[ ;]", line.strip())[0] for line in text.strip().splitlines() if line.strip()}


def test_install_requires_is_lean_and_extras_keep_the_readme_commands_whole():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert _requirements(cfg["options"]["install_requires"]) == {
        "torch",
        "transformers",
        "safetensors",
        "accelerate",
    }
    extras = {name: _requirements(value) for name, value in cfg["options.extras_require"].items()}
    assert {"datasets", "evaluate", "scikit-learn", "scipy"} <= extras["examples"]
    assert (
        extras["examples"] <= extras["all"] and extras["examples"] <= extras["test"]
    )  # README's two commands
    assert "trl" in extras["trl"] and "matplotlib" in extras["plots"]
