#!/usr/bin/env python
"""The official toolkit's faults, measured side by side with ours on the same model and batches.

    PYTHONPATH=/tmp/so-site python benchmarks/bench_vs_official.py   # after the optional install below

Optional dependency (never a project requirement): `pip install --no-deps --target /tmp/so-site
selective-optimizers==0.4`. Without it only our side is measured and the official columns read "n/a".

What it measures, on a tiny BERT (from a config, no downloads) and plain PyTorch loops:
1. budget: entries that actually changed after T steps, for a budget that is not a multiple of T.
2. weight decay: changed entries when decay comes per parameter group (as the HF Trainer builds it), and
   whether decay passed as a keyword is applied at all.
3. Adam bias correction: the first update (in units of lr) of an entry unmasked at step t.
4. optimizer state bytes on the same model and budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from official import count_changed, make_official_id3, official_available  # noqa: E402

from id3_callback import ID3Config, ID3Engine, SparseAdamW  # noqa: E402


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def batches(steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(1, 100, (8, 12), generator=g)
        yield {"input_ids": ids, "labels": torch.randint(0, 2, (8,), generator=g)}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def run_ours(
    budget: int, steps: int, weight_decay: float, run_steps: int | None = None
) -> tuple[int, int, nn.Module]:
    model = tiny_bert()
    before = snapshot(model)
    engine = ID3Engine(model, ID3Config(budget=budget))
    engine.start(steps)
    opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2, weight_decay=weight_decay)
    for batch in batches(run_steps or steps):
        model(**batch).loss.backward()
        engine.step()
        opt.step()
        opt.zero_grad()
    return count_changed(before, model), opt.state_bytes(), model


def run_official(
    budget: int, steps: int, weight_decay: float, run_steps: int | None = None, per_group_decay: bool = False
) -> tuple[int, int, nn.Module]:
    """(changed entries, state bytes, trained model) for the official ID3."""
    import contextlib
    import io

    model = tiny_bert()
    before = snapshot(model)
    if per_group_decay:  # what transformers.Trainer.create_optimizer builds: decay in the param groups
        from selective_optimizers.wrap import get_selective_optimizer

        cls = get_selective_optimizer(torch.optim.AdamW, "id3")
        decay = [p for n, p in model.named_parameters() if "bias" not in n and "LayerNorm" not in n]
        no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        with contextlib.redirect_stdout(io.StringIO()):
            opt = cls(groups, lr=1e-2, budget=budget, max_steps=steps, eps=1e-3, exp=1.0, verify=False)
        step, state = opt.step, opt
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = make_official_id3(
                model, budget, steps, lr=1e-2, weight_decay=weight_decay, fix_step_counter=False
            )
        step, state = wrapped.step, wrapped
    for batch in batches(run_steps or steps):
        model(**batch).loss.backward()
        step()
        model.zero_grad(set_to_none=False)
    state_bytes = state.state_bytes() if hasattr(state, "state_bytes") else -1
    return count_changed(before, model), state_bytes, model


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def first_update_ours(join_steps: list[int], lr: float = 1e-3) -> dict[int, float]:
    """First update / lr of an entry unmasked at step t, SparseAdamW (per-entry step counts)."""
    out = {}
    for t in join_steps:
        w = nn.Parameter(torch.ones(2))
        engine = ID3Engine(nn.ParameterList([w]), ID3Config(budget=2))
        engine.unmasked.add("0", torch.tensor([0]))  # an entry trained from step 1
        opt = SparseAdamW([w], engine.unmasked, lr=lr)
        for step in range(1, t + 1):
            if step == t:
                engine.unmasked.add("0", torch.tensor([1]))
            w.grad = torch.ones(2)
            engine.unmasked.mask_gradients()
            before = w.detach()[1].item()
            opt.step()
        out[t] = abs(w.detach()[1].item() - before) / lr
    return out


def first_update_official(join_steps: list[int], lr: float = 1e-3) -> dict[int, float]:
    """Same measurement for the official ID3 (its Adam step count is per tensor)."""
    import contextlib
    import io

    from selective_optimizers.wrap import get_selective_optimizer

    cls = get_selective_optimizer(torch.optim.AdamW, "id3")
    out = {}
    for t in join_steps:
        # t entries, budget t over t steps: one joins per step; the last one joins at step t.
        w = nn.Parameter(torch.ones(t))
        with contextlib.redirect_stdout(io.StringIO()):
            opt = cls([w], lr=lr, budget=t, max_steps=t, eps=1e-3, exp=1.0, verify=False)
        moved = torch.zeros(t, dtype=torch.bool)
        last = 0.0
        for _ in range(t):
            w.grad = torch.ones(t)
            before = w.detach().clone()
            opt.step()
            delta = (w.detach() - before).abs()
            fresh = (delta > 0) & ~moved
            if fresh.any():
                last = delta[fresh].max().item() / lr
            moved |= delta > 0
        out[t] = last
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results/vs_official.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    have = official_available()
    t0 = time.time()
    budget, steps = 510, 20
    rows = []

    ours_changed, ours_bytes, ours_decayed = run_ours(budget, steps, weight_decay=0.1)
    off = run_official(budget, steps, weight_decay=0.0) if have else None
    rows.append(("budget 510 over 20 steps: entries changed", budget, ours_changed, off and off[0]))
    ours_over, _, _ = run_ours(budget, steps, weight_decay=0.1, run_steps=30)
    off_over = run_official(budget, steps, weight_decay=0.0, run_steps=30) if have else None
    rows.append(
        ("same, 30 steps run (T was 20): entries changed", budget, ours_over, off_over and off_over[0])
    )
    off_group = run_official(budget, steps, weight_decay=0.1, per_group_decay=True) if have else None
    rows.append(
        (
            "weight decay 0.1 per param group: entries changed",
            budget,
            ours_changed,
            off_group and off_group[0],
        )
    )
    # Does decay act at all? Largest change of any weight between decay 0.1 and decay 0 (same batches).
    ours_plain = run_ours(budget, steps, weight_decay=0.0)[2]
    off_kw = run_official(budget, steps, weight_decay=0.1) if have else None
    rows.append(
        (
            "weight decay 0.1 vs 0: max weight difference (0 = decay ignored)",
            "> 0",
            max_difference(ours_decayed, ours_plain),
            off_kw and max_difference(off_kw[2], off[2]),
        )
    )
    rows.append(("optimizer state bytes (budget 510)", "", ours_bytes, off and off[1]))

    join = [1, 10, 100, 1000]
    ours_first = first_update_ours(join)
    off_first = first_update_official(join) if have else {}
    for t in join:
        rows.append(
            (f"first update / lr of an entry unmasked at step {t}", 1.0, ours_first[t], off_first.get(t))
        )

    result = {
        "official_available": have,
        "model": "tiny BERT (hidden 32, 2 layers, 52,386 params), 8x12 random token batches, lr 1e-2",
        "rows": [dict(zip(("measure", "ideal", "id3_callback", "official_0.4"), r)) for r in rows],
        "seconds": round(time.time() - t0, 1),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    table = ["| measure | ideal | id3_callback | official 0.4 |", "|---|---|---|---|"]

    def fmt(v):
        if v is None:
            return "n/a"
        return f"{v:.3g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    table += [f"| {m} | {fmt(i)} | {fmt(o)} | {fmt(x)} |" for m, i, o, x in rows]
    md = "\n".join(table)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(md + "\n")
    print(json.dumps(result, indent=2))
    print(md)
    return result


if __name__ == "__main__":
    main()
