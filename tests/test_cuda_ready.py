"""The package's guarantees on the device the suite runs for: cpu by default, the GPU with `--device cuda`.

Each test trains tiny models from configs in a plain loop (`ID3Engine` + `SparseAdamW`) on `device`.
What holds where (docs/gpu.md):

- exact selection: the engine's choice equals the brute-force top-k of D3 scores computed on the same
  gradients (bitwise, on every device: both read the same gradient tensors, and every score is an
  elementwise function of them);
- budget, masked entries untouched, delta round trip: bitwise on every device (masked entries are never
  written; a delta stores the trained values themselves);
- resume and low-memory == standard mode: two runs compared bitwise. On CPU that is exact. On CUDA the
  `device` fixture turns on `torch.use_deterministic_algorithms` (embedding backward and index_add_ then
  avoid atomics, cuBLAS uses a fixed workspace), which makes the two runs' gradients bitwise equal too;
- bf16 weights: the same checks with bf16 parameters and gradients.

The tests that need the Trainer, subprocesses (DDP), file layouts or CPU timings stay CPU-only: they do
not take `device`, so `pytest --device cuda` deselects them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import brute_force_topk, snapshot, tiny_bert, tiny_llama

from id3_callback import (
    ID3Config,
    ID3Engine,
    SparseAdamW,
    apply_delta,
    available_methods,
    d3_scores,
    save_delta,
)

STEPS = 4
BUDGET = 120


def _batches(kind: str, device, n: int = STEPS + 1, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (4, 10), generator=g)
        labels = torch.randint(0, 2, (4,), generator=g) if kind == "cls" else ids.clone()
        out.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return out


def _model(kind: str, device, dtype=torch.float32):
    model = tiny_bert() if kind == "cls" else tiny_llama(attention_bias=True)
    return model.to(device=device, dtype=dtype).train()


def _engine(model, method="id3", budget=BUDGET, batches=None, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitfit / full announce their fixed budget
        engine = ID3Engine(model, ID3Config(budget=budget, method=method, fisher_samples=4, **config))
    calibration = None
    if batches is not None:
        calibration = lambda: ((model(**b).loss, 4) for b in batches)  # noqa: E731
    engine.start(STEPS, calibration_batches=calibration)
    return engine


def _train(model, engine, batches, start=0, stop=STEPS, opt=None):
    """Steps [start, stop); each step seeds the RNG with its number (dropout), so a resumed run matches."""
    opt = opt or SparseAdamW(engine.parameters(), engine.unmasked, lr=1e-2, weight_decay=0.1)
    for step in range(start, stop):
        torch.manual_seed(step)
        model(**batches[step]).loss.backward()
        engine.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def _untouched(before: dict, model, engine) -> list[str]:
    """Names of tensors with a masked entry whose bits changed."""
    bad = []
    for name, p in model.named_parameters():
        if name in engine.unmasked.dense or name in engine.unmasked.full:
            continue
        keep = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
        if name in engine.unmasked.params:
            keep[engine.unmasked.trained_indices(name)[0]] = False
        a, b = before[name].reshape(-1)[keep], p.detach().reshape(-1)[keep]
        if not torch.equal(a, b):
            bad.append(name)
    return bad


@pytest.mark.parametrize("kind", ["cls", "lm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_selection_is_the_exact_top_k_on_device(kind, dtype, device):
    model = _model(kind, device, dtype)
    engine = _engine(model, budget=400)
    engine.add_global(
        torch.randperm(engine.selectable, generator=torch.Generator().manual_seed(1))[:150].to(device)
    )
    model(**_batches(kind, device)[0]).loss.backward()
    scores = []
    for name, p in engine.unmasked.params.items():
        s = d3_scores(p.grad, p.detach(), 1e-3, 1.0).reshape(-1).clone()
        s[engine.unmasked.indices[name]] = float("-inf")
        scores.append(s.cpu())
    for k in (1, 37, 250):
        _, index = engine.scan.top_by_gradient(k, engine.method.score_fn())
        assert torch.equal(index.cpu(), brute_force_topk(scores, k)), k


@pytest.mark.parametrize("method", sorted(available_methods()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_methods_keep_budget_masked_entries_and_deltas_on_device(method, dtype, device, tmp_path):
    model = _model("lm", device, dtype)
    batches = _batches("lm", device)
    before = snapshot(model)
    engine = _engine(model, method, batches=batches)
    _train(model, engine, batches)
    expected = {
        "bitfit": sum(p.numel() for n, p in engine.unmasked.params.items() if n.endswith("bias")),
        "full": engine.selectable,
    }.get(method, BUDGET)
    assert len(engine.unmasked) == expected
    assert _untouched(before, model, engine) == []
    path = save_delta(engine, tmp_path / "delta.safetensors")
    fresh = _model("lm", device, dtype)
    apply_delta(fresh, path)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a.detach(), b.detach()), name


@pytest.mark.parametrize("kind", ["cls", "lm"])
def test_resume_equals_the_uninterrupted_run_on_device(kind, device, tmp_path):
    batches = _batches(kind, device)
    model = _model(kind, device)
    engine = _engine(model)
    _train(model, engine, batches)

    first = _model(kind, device)
    engine1 = _engine(first)
    opt1 = _train(first, engine1, batches, stop=2)
    engine1.save(tmp_path)
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, tmp_path / "rest.pt")

    second = _model(kind, device)
    engine2 = _engine(second)
    engine2.load(tmp_path)
    rest = torch.load(tmp_path / "rest.pt", map_location=device)
    second.load_state_dict(rest["model"])
    opt2 = SparseAdamW(engine2.parameters(), engine2.unmasked, lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(rest["opt"])
    _train(second, engine2, batches, start=2, opt=opt2)
    assert engine2.unmasked.fingerprint() == engine.unmasked.fingerprint()
    for (name, a), b in zip(model.named_parameters(), second.parameters()):
        assert torch.equal(a.detach(), b.detach()), name


@pytest.mark.parametrize("kind", ["cls", "lm"])
def test_low_memory_mode_equals_the_standard_mode_on_device(kind, device):
    batches = _batches(kind, device)
    runs = []
    for low_memory in (False, True):
        model = _model(kind, device)
        engine = _engine(model, low_memory=low_memory)
        assert engine.low_memory_active == low_memory
        _train(model, engine, batches)
        runs.append((model, engine))
    (a, ea), (b, eb) = runs
    assert ea.unmasked.fingerprint() == eb.unmasked.fingerprint()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa.detach(), pb.detach()), name
