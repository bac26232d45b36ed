"""A script's delta applies to its base model loaded again in a fresh process (as a user ships it).

The GLUE script trains a new classification head whole (its values are random at load time, so they differ
in every process); a delta can only apply elsewhere if it replaces such tensors whole without checking
their base values, which is the "replaced whole" delta format of the reliability issue (15).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from test_scripts import bert_dir, train_stsb  # noqa: F401 (bert_dir: fixture)

ROOT = Path(__file__).resolve().parents[1]

APPLY = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForSequenceClassification
    from id3_callback import apply_delta, load_delta
    torch.manual_seed(1234)  # another process: another random head
    model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=1, ignore_mismatched_sizes=True)
    apply_delta(model, sys.argv[2])
    delta, params = load_delta(sys.argv[2]), dict(model.named_parameters())
    for name, (idx, values) in delta.sparse.items():
        assert torch.equal(params[name].detach().reshape(-1)[idx], values), name
    for name, values in delta.dense.items():
        assert torch.equal(params[name].detach(), values), name
    print("applied")
    """
)


def test_glue_delta_with_a_new_head_applies_in_a_fresh_process(tmp_path, bert_dir):  # noqa: F811
    out = train_stsb(tmp_path, bert_dir, max_steps=2)
    proc = subprocess.run(
        [sys.executable, "-c", APPLY, bert_dir, str(out / "delta.safetensors")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0 and "applied" in proc.stdout, proc.stderr[-2000:]
