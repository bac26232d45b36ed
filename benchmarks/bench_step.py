#!/usr/bin/env python
"""Time of one training step: ID3 against full fine-tuning, LoRA and the official ID3, side by side.

    python benchmarks/bench_step.py                       # writes benchmarks/results/step.json + step.md
    PYTHONPATH=/tmp/so-site python benchmarks/bench_step.py   # adds the official ID3 (optional, see below)

Setting (the issue's): the packaged all-MiniLM-L6-v2 with a 2-way head, real SST-2 batches (16 x 64
tokens, MiniLM tokenizer), budget 0.17% of the weights, CPU, 2 threads. Every variant has its own copy
of the model and sees the same batches; variants run interleaved step by step (their order rotating)
so load from other processes hits them alike, and ratios are taken per step, then the median.

Variants: full fine-tuning with fused AdamW, and a second, identical copy of it (`full_copy`: its ratio to
`full` shows how far two identical variants drift apart here, the resolution of every other ratio); ID3
standard and low-memory mode (SparseAdamW, row-sparse embedding gradients as ID3Trainer sets them by
default), and ID3 with a dense embedding gradient (`id3_dense_grads`, what the row-sparse backward saves);
`floor`: every weight frozen, backward computes only dX through every layer (what any method that trains
weights inside the layers must at least spend; LoRA adds its adapters to it); `floor_rest`: the same, but
the tensors ID3 still scores densely (biases, norms, position embeddings) train with AdamW: the floor of the
bounded path, which replaces only the large Linear weights' dW (and the table's, by row-sparse gradients). ID3 with bounded weight gradients (`id3_bounded`; `id3_bounded_torch`: the same without its native
kernels, ID3_NATIVE=0; `id3_bounded_bound`: every layer by the bound, never GEMM rows; `id3_bounded_bound_torch`: that with the torch code); peft LoRA r=8 on query/value (fused AdamW); the official `selective-optimizers`
0.4 ID3 when importable (optional: `pip install --no-deps --target /tmp/so-site selective-optimizers==0.4`, then
PYTHONPATH=/tmp/so-site). A step is forward + backward + (ID3: scoring, selection, masking) +
optimizer step + zero_grad. ID3 starts mid-schedule (step T/2, half the budget unmasked, chosen by
D3 on a warm-up batch), where its per-step work is typical; the official ID3 starts at step 0 (its
cost does not depend on the set size: it scores and masks every entry densely).

A second, shorter phase times the parts of the ID3 step (scoring, selection, masking, optimizer) with
timers around the engine's internals, and the Trainer's own gradient-norm pass. A third alternates the
`id3` model's steps between row-sparse and dense embedding gradients: the saving on one model, free of
the placement drift that separates two model copies (see `full_copy`).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time

import torch

# this checkout's id3_callback (and the helpers next to this file), whatever else is installed
sys.path[:0] = [
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
]

import benchutil  # noqa: E402
from official import make_official_id3, official_available  # noqa: E402

import id3_callback.bounded as bounded_mod  # noqa: E402
import id3_callback.bounded_costs as bounded_costs  # noqa: E402
import id3_callback.selection as selection_mod  # noqa: E402
from id3_callback import ID3Config, ID3Engine, SparseAdamW, save_delta  # noqa: E402

# Fixed GEMM-rows thresholds of the variants that force one branch on every layer; None: measured (the default)
FIXED_TOKENS = {"id3_bounded_bound": 0, "id3_bounded_bound_torch": 0, "id3_bounded_rows": 10**9}


def now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class Variant:
    """One model copy and its optimizer; `step(batch)` returns the stage times in ms."""

    def __init__(self, name: str, model, optimizer, engine: ID3Engine | None = None) -> None:
        self.name, self.model, self.optimizer, self.engine = name, model, optimizer, engine
        # `<variant>@0.5`: the bounded path with bounded.MARGIN 0.5 (τ_guess = 0.5 x last cut) for this variant;
        # otherwise the margin in force when the variants are built (--margin's, or the default)
        base, _, margin = name.partition("@")
        self.margin = float(margin) if margin else bounded_mod.MARGIN
        # `..._torch`: the bounded path's torch code instead of its native kernels (id3_callback.native)
        self.native = "0" if base.endswith("_torch") else "1"
        # `id3_bounded`: each layer's branch measured in its first steps (bounded_costs); `id3_bounded_bound`:
        # every layer by the bound; `id3_bounded_rows`: every layer by GEMM rows (the old fixed rule's choice
        # on these models: at most 1,024 live tokens)
        self.fixed_tokens = FIXED_TOKENS.get(base)

    def activate(self) -> None:
        """This variant's settings of the bounded path, which it reads per call: variants interleave in one process."""
        os.environ["ID3_NATIVE"] = self.native  # read at each kernel call
        bounded_costs.FIXED_TOKENS = self.fixed_tokens  # read at each layer's backward
        bounded_mod.MARGIN = self.margin  # read at each step

    def step(self, batch: dict) -> dict[str, float]:
        self.activate()
        t0 = now()
        self.model(**batch).loss.backward()
        t1 = now()
        if self.engine is not None:
            self.engine.step()
        t2 = now()
        self.optimizer.step()
        t3 = now()
        self.optimizer.zero_grad(set_to_none=True)
        t4 = now()
        ms = 1000.0
        return {
            "step": (t4 - t0) * ms,
            "fwd_bwd": (t1 - t0) * ms,
            "engine": (t2 - t1) * ms,
            "optimizer": (t3 - t2) * ms,
            "zero_grad": (t4 - t3) * ms,
        }


class NoOptimizer:
    """The `floor` variant's optimizer: it has no parameter to update."""

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


_SMOLLM = []


def make_model(args):
    """A fresh copy of the benchmarked model (SmolLM2 is dequantized once, then copied)."""
    if args.model == "minilm":
        return benchutil.minilm_classifier(seed=0)
    if not _SMOLLM:
        _SMOLLM.append(benchutil.smollm()[0])
    return copy.deepcopy(_SMOLLM[0])


def build_variants(args, warm_batch: dict) -> list[Variant]:
    names = args.variants.split(",")
    variants = []
    total = sum(p.numel() for p in make_model(args).parameters())
    budget = max(1, round(args.budget * total))
    start_at = args.total_steps // 2
    std_engine = None
    device = torch.device(args.device)
    for full_name in names:
        name = full_name.partition("@")[0]
        model = make_model(args).to(device)
        model.train()
        if name in ("full", "full_copy"):
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
            variants.append(Variant(full_name, model, opt))
        elif name in (
            "id3",
            "id3_low_memory",
            "id3_dense_grads",
            "id3_bounded",
            "id3_bounded_torch",
            "id3_bounded_keep",
            "id3_bounded_bound",
            "id3_bounded_bound_torch",
            "id3_bounded_rows",
        ):
            # Row-sparse embedding gradients as ID3Trainer sets them by default; `id3_dense_grads` without.
            # `id3_bounded`: no dense weight gradient for the Linear layers (ID3Config.weight_grads), with
            # its default pointwise recomputation; `id3_bounded_keep`: without it.
            config = ID3Config(
                budget=args.budget,
                low_memory=name == "id3_low_memory",
                sparse_embedding_grads=name != "id3_dense_grads",
                weight_grads="bounded" if name.startswith("id3_bounded") else "dense",
                recompute_pointwise=False if name == "id3_bounded_keep" else None,
            )
            engine = ID3Engine(model, config)
            engine.start(args.total_steps)
            if std_engine is None:  # fast-forward to mid-schedule with a D3 selection on a warm-up batch
                probe = make_model(args).to(device)
                probe_engine = ID3Engine(probe, ID3Config(budget=args.budget))
                probe_engine.start(args.total_steps)
                probe(**warm_batch).loss.backward()
                k = probe_engine.schedule.target(start_at)
                _, index = probe_engine.scan.top_by_gradient(k, probe_engine.method.score_fn())
                probe_engine.add_global(index)
                std_engine = probe_engine
            engine.unmasked.load_state_dict(std_engine.unmasked.state_dict())
            engine.steps_done = start_at
            opt = SparseAdamW(engine.parameters(), engine.unmasked, lr=args.lr)
            variants.append(Variant(full_name, model, opt, engine))
        elif name == "lora":
            from peft import LoraConfig, get_peft_model

            minilm = args.model == "minilm"
            config = LoraConfig(
                r=8,
                lora_alpha=16,
                lora_dropout=0.0,
                target_modules=["query", "value"] if minilm else ["q_proj", "v_proj"],
                task_type="SEQ_CLS" if minilm else "CAUSAL_LM",
            )
            model = get_peft_model(model, config)
            opt = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=args.lr, fused=True
            )
            variants.append(Variant(full_name, model, opt))
        elif name in ("floor", "floor_rest"):
            # No weight gradient at all, only dX through every layer (the embeddings' output requires grad):
            # the least backward any method spends that trains weights inside every layer. LoRA is this
            # plus its adapters; ID3 (any path) is this plus scoring the masked entries. `floor_rest`: only
            # the large Linear weights (the bounded path's) and the input embedding table frozen; the other
            # tensors (biases, norms, position embeddings), which ID3 scores densely, train with AdamW.
            bounded = {
                id(m.weight)
                for m in model.modules()
                if isinstance(m, torch.nn.Linear) and m.weight.numel() >= selection_mod.BOUNDED_MIN_ENTRIES
            }
            bounded.add(id(model.get_input_embeddings().weight))
            rest = [p for p in model.parameters() if name == "floor_rest" and id(p) not in bounded]
            trained = {id(p) for p in rest}
            for p in model.parameters():
                p.requires_grad_(id(p) in trained)
            model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
            opt = torch.optim.AdamW(rest, lr=args.lr, fused=True) if rest else NoOptimizer()
            variants.append(Variant(full_name, model, opt))
        elif name == "official":
            if not official_available():
                print("official ID3 not importable: skipped (see the module docstring)", file=sys.stderr)
                continue
            opt = make_official_id3(model, budget=budget, total_steps=args.total_steps, lr=args.lr)
            variants.append(Variant(full_name, model, opt))
        else:
            raise SystemExit(f"unknown variant {name!r}")
    return variants


class StageTimers:
    """Wraps the ID3 engine's internals with timers (breakdown phase only: they add a little overhead)."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = {}
        self.original_d3 = selection_mod.d3_scores

    def timed(self, key: str, fn):
        def wrapper(*a, **kw):
            t0 = now()
            try:
                return fn(*a, **kw)
            finally:
                self.acc[key] = self.acc.get(key, 0.0) + (now() - t0) * 1000.0

        return wrapper

    def install(self, engine: ID3Engine) -> None:
        selection_mod.d3_scores = self.timed("scoring", self.original_d3)
        engine.method.on_step = self.timed("select_total", engine.method.on_step)
        engine.unmasked.mask_gradients = self.timed("masking", engine.unmasked.mask_gradients)
        low_memory = engine.low_memory_mode
        if low_memory is not None:  # the hooks look `_on_grad_ready` up on the object at each call
            low_memory._on_grad_ready = self.timed("hooks_total", low_memory._on_grad_ready)
            low_memory.finish = self.timed("finish_total", low_memory.finish)

    def take(self) -> dict[str, float]:
        out, self.acc = self.acc, {}
        return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return (min(values, default=math.nan), max(values, default=math.nan))
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    count = args.warmup + args.steps + args.breakdown_steps + 1  # the A/B phase reuses the first ones
    if args.model == "minilm":
        batches = benchutil.sst2_batches(benchutil.minilm_tokenizer(), count, args.batch, args.seq)
    else:
        batches = benchutil.xsum_batches(benchutil.smollm()[1], count, args.batch, args.seq)
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    variants = build_variants(args, batches[0])
    names = [v.name for v in variants]
    records: dict[str, list[dict]] = {n: [] for n in names}

    # Phase 1: headline step times, interleaved, no instrumentation.
    for i, batch in enumerate(batches[1 : 1 + args.warmup + args.steps]):
        order = variants[i % len(variants) :] + variants[: i % len(variants)]
        for v in order:
            times = v.step(batch)
            if i >= args.warmup:
                records[v.name].append(times)

    # Phase 2: where the ID3 time goes (timers around the engine's parts), plus the Trainer's norm pass.
    timers = StageTimers()
    parts: dict[str, list[dict]] = {}
    norm_ms: dict[str, list[float]] = {
        key: []
        for key in ("clip_grad_norm_inf", "engine_grad_norm", "clip_grad_norm_1", "engine_clip_grad_norm_1")
    }
    id3_variants = [v for v in variants if v.engine is not None]
    for v in id3_variants:
        timers.install(v.engine)
    for batch in batches[1 + args.warmup + args.steps :]:
        for v in id3_variants:
            v.activate()
            timers.take()
            t0 = now()
            v.model(**batch).loss.backward()
            t1 = now()
            v.engine.step()
            t2 = now()
            if v.name == "id3_dense_grads":  # torch's passes, which cannot read row-sparse gradients
                a = now()
                torch.nn.utils.clip_grad_norm_(v.model.parameters(), float("inf"))
                b = now()
                v.engine.grad_norm()
                c = now()
                torch.nn.utils.clip_grad_norm_(v.model.parameters(), 1.0)
                d = now()
                v.engine.clip_grad_norm_(1.0)
                e = now()
                norm_ms["clip_grad_norm_inf"].append((b - a) * 1000)
                norm_ms["engine_grad_norm"].append((c - b) * 1000)
                norm_ms["clip_grad_norm_1"].append((d - c) * 1000)
                norm_ms["engine_clip_grad_norm_1"].append((e - d) * 1000)
            t3 = now()
            v.optimizer.step()
            t4 = now()
            v.optimizer.zero_grad(set_to_none=True)
            got = timers.take()
            scoring = got.get("scoring", 0.0)
            selecting = (
                got.get("select_total", 0.0) + got.get("hooks_total", 0.0) + got.get("finish_total", 0.0)
            )
            parts.setdefault(v.name, []).append(
                {
                    "fwd_bwd": (t1 - t0) * 1000 - got.get("hooks_total", 0.0),
                    "scoring": scoring,
                    "selection": selecting - scoring,
                    "masking": got.get("masking", 0.0),
                    "engine_other": (t2 - t1) * 1000
                    - got.get("select_total", 0.0)
                    - got.get("finish_total", 0.0)
                    - got.get("masking", 0.0),
                    "optimizer": (t4 - t3) * 1000,
                }
            )
    selection_mod.d3_scores = timers.original_d3

    # Phase 3: what the row-sparse embedding gradient saves, on one model (the same memory placement), with
    # steps alternating between row-sparse and dense embedding gradients (A/B/B/A order).
    ab: dict[str, list[dict]] = {"sparse": [], "dense": []}
    id3 = next((v for v in variants if v.name == "id3"), None)
    if id3 is not None and id3.engine.sparse_tables and args.ab_steps:
        ab_batches = batches[1 : 1 + args.ab_steps]
        for i, batch in enumerate(ab_batches):
            for mode in ("sparse", "dense") if i % 2 == 0 else ("dense", "sparse"):
                if mode == "dense":
                    id3.engine.remove_hooks()
                times = id3.step(batch)
                if mode == "dense":
                    id3.engine.start(args.total_steps)  # puts the row-sparse hooks back
                ab[mode].append(times)

    # Results.
    full = records.get("full")
    out = {
        "benchmark": "step",
        "setting": {
            "model": "all-MiniLM-L6-v2 (+2-way head)" if args.model == "minilm" else "SmolLM2-135M-Instruct",
            "data": "SST-2 train, first batches in file order"
            if args.model == "minilm"
            else "XSum train articles, first in file order",
            "batch": args.batch,
            "seq": args.seq,
            "budget_fraction": args.budget,
            "total_steps": args.total_steps,
            "id3_start_step": args.total_steps // 2,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "device": args.device,
        },
        "machine": benchutil.machine(),
        "variants": {},
    }
    for v in variants:
        rec = records[v.name]
        row = {key: median([r[key] for r in rec]) for key in rec[0]}
        row["step_iqr"] = quartiles([r["step"] for r in rec])
        if full is not None:
            ratios = [r["step"] / f["step"] for r, f in zip(rec, full)]
            row["ratio_vs_full"] = median(ratios)
            row["ratio_iqr"] = quartiles(ratios)
        if v.name in parts:
            row["breakdown"] = {key: median([p[key] for p in parts[v.name]]) for key in parts[v.name][0]}
        if v.engine is not None:
            row["unmasked_at_end"] = len(v.engine.unmasked)
            row["budget"] = v.engine.budget
            row["optimizer_state_bytes"] = v.optimizer.state_bytes()
            if v.engine.bounded is not None:
                v.activate()  # its own fixed threshold (or none), which the summary reads
                costs = v.engine.branch_costs
                row["branches"] = costs.summary()
                row["rows_below"] = dict(costs.rows_below)
                row["gemm_rows_share"] = v.engine.bounded.last_step.get("dense")
                # over every step it ran (warm-up and probes included): re-scored steps, entries verified
                row["uncertified_steps"] = v.engine.bounded.uncertified_steps
                row["bounded_steps"] = v.engine.bounded.steps
                row["survivors_mean"] = v.engine.bounded.survivors / max(v.engine.bounded.steps, 1)
        out["variants"][v.name] = row
    if ab["sparse"]:
        out["row_sparse_ab"] = {
            mode: {key: median([r[key] for r in rows]) for key in rows[0]} for mode, rows in ab.items()
        }
        out["row_sparse_ab"]["steps"] = len(ab["sparse"])
        out["row_sparse_ab"]["ratio"] = median(
            [s["step"] / d["step"] for s, d in zip(ab["sparse"], ab["dense"])]
        )
    if norm_ms["clip_grad_norm_inf"]:
        out["trainer_grad_norm_ms"] = {key: median(val) for key, val in norm_ms.items()}
    id3 = next((v for v in variants if v.name == "id3"), None)
    if id3 is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_delta(id3.engine, os.path.join(tmp, "delta.safetensors"))
            size = os.path.getsize(path)
        out["delta"] = {
            "entries": len(id3.engine.unmasked),
            "bytes": size,
            "bytes_per_entry": size / max(len(id3.engine.unmasked), 1),
        }
        print(
            f"delta: {size:,} bytes for {len(id3.engine.unmasked):,} entries = "
            f"{size / len(id3.engine.unmasked):.2f} bytes per unmasked entry"
        )
    return out


def markdown(result: dict) -> str:
    rows = []
    for name, row in result["variants"].items():
        b = row.get("breakdown", {})
        rows.append(
            [
                name,
                row["step"],
                row.get("ratio_vs_full"),
                row["fwd_bwd"],
                row["engine"] if name.startswith("id3") else None,
                row["optimizer"],
                b.get("scoring"),
                b.get("selection"),
                b.get("masking"),
            ]
        )
    header = [
        "variant",
        "step ms",
        "x full",
        "fwd+bwd ms",
        "engine.step ms",
        "optimizer ms",
        "scoring ms",
        "selection ms",
        "masking ms",
    ]
    s = result["setting"]
    text = (
        f"Step time, {s['model']}, batch {s['batch']} x {s['seq']}, budget {100 * s['budget_fraction']:.2f}%, "
        f"{s['threads']} threads, median of {s['steps']} interleaved steps ({result['machine']['date']}, "
        f"{result['machine']['cpu']}, load {result['machine']['load_1min']:.1f}).\n\n"
    )
    text += benchutil.markdown_table(header, rows)
    text += (
        "\nLow-memory mode scores inside backward (gradient hooks), so its scoring and selection are part of "
        "its fwd+bwd column; the breakdown columns come from a separate instrumented phase.\n"
    )
    if "row_sparse_ab" in result:
        a = result["row_sparse_ab"]
        s, d = a["sparse"], a["dense"]
        text += (
            f"\nRow-sparse embedding gradients A/B on the id3 model, {a['steps']} steps each, alternating: step "
            f"{s['step']:.0f} ms against {d['step']:.0f} ms with a dense embedding gradient ({a['ratio']:.3f}x); "
            f"fwd+bwd {s['fwd_bwd']:.0f} against {d['fwd_bwd']:.0f}, engine.step {s['engine']:.1f} against "
            f"{d['engine']:.1f}, optimizer {s['optimizer']:.1f} against {d['optimizer']:.1f}, zero_grad "
            f"{s['zero_grad']:.1f} against {d['zero_grad']:.1f} ms.\n"
        )
    if "trainer_grad_norm_ms" in result:
        g = result["trainer_grad_norm_ms"]
        text += (
            f"\nGradient norm, which the Trainer takes every step (even with max_grad_norm=0): torch's "
            f"clip_grad_norm_(inf) over the dense masked gradients of id3_dense_grads {g['clip_grad_norm_inf']:.2f} ms; "
            f"the engine's O(B) norm, which ID3Trainer uses instead, {g['engine_grad_norm']:.2f} ms. Clipping "
            f"(max_grad_norm=1.0, the Trainer's default): torch's clip_grad_norm_ {g['clip_grad_norm_1']:.2f} ms, "
            f"the engine's clip_grad_norm_ {g['engine_clip_grad_norm_1']:.2f} ms.\n"
        )
    if "delta" in result:
        d = result["delta"]
        text += f"\nDelta size: {d['bytes']:,} bytes for {d['entries']:,} entries = {d['bytes_per_entry']:.2f} B/entry.\n"
    return text


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants", default="full,id3,id3_bounded,id3_low_memory,id3_dense_grads,lora,official,full_copy"
    )
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timers synchronize CUDA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.0017)
    parser.add_argument(
        "--total-steps", type=int, default=1000, help="schedule length T (u_t = B/T per step)"
    )
    parser.add_argument("--steps", type=int, default=30, help="measured steps per variant")
    parser.add_argument(
        "--warmup",
        type=int,
        default=6,
        help="untimed steps per variant: at least 5, so that `id3_bounded`'s probe steps (one without a "
        "threshold guess, then 4 measuring its branches, bounded_costs.py) are behind it",
    )
    parser.add_argument("--breakdown-steps", type=int, default=8)
    parser.add_argument(
        "--ab-steps", type=int, default=20, help="steps of each mode in the row-sparse gradient A/B (0: skip)"
    )
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument(
        "--margin",
        type=float,
        default=None,
        help="bounded.MARGIN for every variant (τ_guess = margin x last cut)",
    )
    parser.add_argument("--out", default=str(benchutil.RESULTS / "step.json"))
    args = parser.parse_args(argv)
    if args.margin is not None:
        bounded_mod.MARGIN = args.margin
    result = run(args)
    return benchutil.save_result(result, args.out, markdown)


if __name__ == "__main__":
    main()
