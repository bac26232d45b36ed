"""Bounded weight gradients (`ID3Config(weight_grads="bounded")`): ID3 without a dense dW for Linear layers.

For a Linear layer with input h (T tokens x in) and output gradient g (T x out), dW = gᵀh costs O(in·out·T),
a third of the layer's FLOPs. ID3 needs only two things from it: the D3 scores of masked entries, to find the
k best, and the exact gradient at the unmasked entries U, for the optimizer. Here backward computes dX as
usual and, instead of dW:

- tokens whose output-gradient row is all zero (padding; every position but the pooled one in a classifier's
  last layer) add exact zeros to every product and are dropped first (`live_tokens`: 86% of MiniLM's on
  SST-2 16 x 64);
- per layer and step, one of two branches, chosen by their costs measured on this machine
  (`bounded_costs.py`). GEMM rows: dW is computed a GEMM row block at a time and scored like a dense
  gradient (every entry verified; O(chunk) memory, no dW-sized tensor). Its cost grows with the live
  tokens, so it wins on few of them;
- or the bound. Over G contiguous token groups, |dW_ij| <= Σ_g ‖g_g,i‖·‖h_g,j‖ (Cauchy–Schwarz per
  group), so bound_ij / (|θ_ij| + ε)^exp bounds the D3 score. O((in + out)·T) for the norms, O(in·out·G)
  for the bound, computed one row block at a time into a reused buffer; exact scores for the masked
  entries whose bound reaches a threshold τ: gathered dot products over T (`sampled_products`, one call per
  layer), or one GEMM for a row block where more than `DENSE_FRACTION` of its entries survive;
- exact gradients at U, kept as `UnmaskedSet.grad_stash` (what `SparseAdamW`, the gradient norm and
  clipping read when `p.grad` is None): from the GEMM rows, or from one GEMM over the box of rows x columns
  the unmasked entries cluster in (`unmasked_products`). The weight's `p.grad` is never allocated.

An output layer whose weight is also the input embedding table (most causal LMs) is one of these layers
for every row outside the step's input tokens; `bounded_tied.py` scores the token rows, whose gradient
also has the embedding's part, at `step()` (`BoundedGrads.finish_backward`).

Native kernels (`native.py`, plain C compiled on first use): the live-token scan, the scoring of GEMM row
blocks (one pass that hands the running top-k only the entries at or above its k-th value), the group bound
(one pass, rows that cannot reach the level skipped), the group norms (one pass, no squared copy) and the
gathered dot products. The first two give the torch code's results bitwise (kept tokens; scores, gradients
and top-k), so the default cost model's branch (GEMM rows) is bitwise the torch code's. The bound branch's
sums run in other orders than the torch code's (group norms: a sequential sum, not a GEMM; dot products:
32 running sums, not sampled_addmm's), so there a score can differ in the last bits and a candidate set
near the level; each is still a bound or an fp32 evaluation of the same sum, inside `slack`, so the step
stays certified-exact and the selection differs only where two scores tie within rounding. The two native
dot-product kernels keep the same order, so a value never depends on the other pairs of its call.
tests/test_native.py checks the GEMM-rows branch bitwise and the bound branch up to that rounding (bitwise
where every sum is exact) on random layers. The torch code runs wherever the kernels do not apply
(`ID3_NATIVE=0`, no compiler, exp other than 0 or 1, a block with a non-finite score).

**Exactness is certified.** Verified entries go into one running top-k per backward (`_Pass.top`). Its k-th
value c_run only grows as entries arrive, and the step's final cut c (after every other tensor is scored too)
is at least c_run. A layer is scored with τ = max(τ_guess, c_run), τ_guess a margin below last step's cut. An
entry left unverified has score <= bound·slack < τ (`slack` covers float rounding of either evaluation: any
order of summing T products stays within (1 + γ_T) of Σ|g·h|). So a layer is exact once c >= τ, strictly
above every unverified entry (no tie is possible). A layer scored with τ_guess > c_run keeps its (g, h) until
c_run reaches τ_guess; if the step ends below it (`certify`), those layers are scored again with τ = c, and
the step counts as uncertified. Ties follow the package's rule (lower global index), as everywhere.

What "exact" means here: the selection is the exact top-k of the scores this path computes, each an fp32
evaluation of Σ_t g_ti·h_tj. A gathered dot product sums in another order than the GEMM, so a score can differ
from the dense path's in the last bits (relative 1e-6 typically), and the chosen set can differ from the dense
path's only where two scores tie within that rounding. Given the same state (last step's cut and each layer's
branch choice, both saved in the engine state) the path is deterministic, so a run resumed after the branch
costs' probe steps is bitwise the uninterrupted one. Two fresh runs measure their own branch costs, so they
can differ by such ties unless `ID3Config(bounded_gemm_tokens=N)` fixes the branches.

Example (the engine installs it at `start` when the plan says so):
    >>> engine = ID3Engine(model, ID3Config(budget=1000, weight_grads="bounded"))  # doctest: +SKIP
    >>> engine.start(100); loss.backward(); engine.step()                        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from . import native, selection
from .bounded_costs import BranchCosts
from .masks import UnmaskedSet
from .scores import d3_scores
from .selection import INELIGIBLE, StreamingTopK, TensorScorer, at_least

# Token groups of the bound. More groups tighten it (MiniLM, u = 613: 0.21% of entries reach the cut with 1
# group, 0.16% with 16) for O(in·out·G) more work, 1.6% of a GEMM's at T = 1024.
GROUPS = 16
# A row block whose surviving entries exceed this fraction is computed by one GEMM (measured on 2 cores, T = 1024:
# sampled_addmm ~300-600 ns per entry against ~40 ns for a GEMM's entry; at T = 512, 1 thread, 2026-12-02:
# native gathered products ~25-170 ns, a GEMM entry ~5.6 ns, so 0.08 stays near the crossover).
DENSE_FRACTION = 0.08
# τ_guess = MARGIN x last step's cut: lower verifies more entries, higher risks an uncertified step.
MARGIN = 0.9
# Threads for the bounded bookkeeping (norms, bound blocks, sampled products): about a hundred small ops per
# layer. With 2 threads each op waits on an OpenMP barrier, and on a loaded 2-core machine that wait is the cost
# (measured at load 5: 0.4 s per MiniLM step with 1 thread against 2.3-4.5 s with 2). GEMMs of dX keep theirs.
THREADS = 1
# Below this threshold every entry is verified: the fp32 bound's products could underflow.
TINY = 1e-20
# The bound is computed this many entries (rows x in) at a time.
BLOCK_ENTRIES = 1 << 20
# The unmasked entries' gradients come from one GEMM over the rows x columns they occupy when that box holds at
# most this many entries per unmasked one (they cluster: MiniLM mid-run, 18K entries in a 137K box), else from
# gathered dot products. Measured on 2 cores: a GEMM entry ~40 ns at T = 1024, a gathered one ~600-1800 ns.
BOX_FACTOR = 32
# With the native dot products (~25 ns per pair at T = 512, 1 thread, against ~5.6 ns for a GEMM's entry).
BOX_FACTOR_NATIVE = 4
# Native gathered products: pairs read in place while fewer than this many per column they read (of a and b
# together); else the columns are copied first. In place, each pair-token is a gather from a row of a and of
# b: cheap while a and b sit in cache (crossover ~4.4 at T = 512 on an Intel Xeon, ~5 at 64 x (384 + 384) on
# an AMD EPYC), ~5 ns a pair-token once they do not (512 x (576 + 1536), SmolLM2's MLP: crossover ~0.55 on the
# EPYC, so only pairs that nearly all have a row and a column of their own). `benchmarks/bench_products.py`.
PAIR_FACTOR = 4
PAIR_FACTOR_LARGE = 0.55
PAIR_CACHE_BYTES = 1 << 18  # a and b together (T x (R + C) floats) above this: PAIR_FACTOR_LARGE
# `index_set` counts (O(n + size)) instead of sorting from this many indices on (crossover ~500 here).
INDEX_SET_MIN = 512
# Tokens are dropped from a layer's products when at least this fraction contribute exactly nothing (padding,
# and every position but the pooled one in the last layer of a classifier: 86% of MiniLM's on SST-2 16 x 64).
DEAD_FRACTION = 1 / 16
# The native block scorer hands over at most this many (or k) candidates; a block with more is scored by the
# torch code (early in a step, while the running k-th value is still low).
NATIVE_CAP = 1 << 14


def slack(tokens: int) -> float:
    """Factor by which a computed bound is raised so that it bounds any fp32 evaluation of the score."""
    return 1.0 + 4.0 * tokens * 2.0**-24 + 1e-5


def group_norms(a: torch.Tensor, groups: int) -> torch.Tensor:
    """(G x n) norms of the columns of `a` (T x n) over G contiguous token groups, each >= the exact norm.

    Squares in fp32, summed in one pass by the native kernel or by one GEMM with a 0/1 group matrix (another
    order: the two can differ in the last bits, both bound the norm): a square below 2^-126 may lose its
    value, so T·2^-126 is added to every sum; the factor covers the sum's and the root's rounding."""
    t = a.shape[0]
    groups = max(1, min(groups, t))
    if native.library() is not None and native.takes(a) and t > 0:
        sums = native.group_square_sums(a, groups)  # no squared copy of `a` (the output layer's: 100 MB)
    else:
        sums = _group_matrix(t, groups, a.dtype, a.device).mm(a.square())
    return sums.add_(t * 2.0**-126).sqrt_().mul_(1 + 2 * t * 2.0**-24)


@functools.lru_cache(maxsize=8)
def _group_matrix(tokens: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(groups x tokens) 0/1 matrix: row g marks the tokens of group g (contiguous, sizes differing by <= 1)."""
    member = torch.arange(tokens, device=device) * groups // tokens
    return (member[None, :] == torch.arange(groups, device=device)[:, None]).to(dtype)


def live_tokens(grad: torch.Tensor, other: torch.Tensor) -> torch.Tensor | None:
    """Token rows to keep for the products gradᵀ·other (either order), or None (keep all): drops the tokens
    whose output gradient row is all zero, when they are at least `DEAD_FRACTION` of the tokens.

    Such a token adds exact zeros to every Σ_t g_ti·h_tj, so each score and gradient is the same sum over
    fewer tokens. A zero row against a non-finite input row is kept (0·inf is NaN, and the dense path sees
    it), and so is a non-finite gradient row (its max is NaN or inf, not 0). Reads `grad`'s first column, then
    only the rows it starts with a zero, and sums `other` when there is something to drop.

    Example:
        >>> g, h = torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 3.0]]), torch.ones(3, 4)
        >>> live_tokens(g, h).tolist()
        [0, 2]
    """
    tokens, enough = grad.shape[0], max(1.0, DEAD_FRACTION * grad.shape[0])
    if native.library() is not None and native.takes(grad, other):
        return native.live_rows(grad, other, enough)  # the same rows, in one pass over the two
    maybe = (grad[:, 0] == 0).nonzero().view(-1)  # a dead row starts with a zero: one column read first
    if maybe.numel() < enough:
        return None
    dead = torch.zeros(tokens, dtype=torch.bool, device=grad.device)
    dead[maybe] = grad.index_select(0, maybe).abs().amax(1) == 0
    if int(dead.sum()) < enough:
        return None
    if not math.isfinite(other.sum().item()):
        dead &= torch.isfinite(other).all(1)
    keep = (~dead).nonzero().view(-1)
    return keep if keep.numel() else keep.new_zeros(1)  # one dead token: every product exactly zero


def unmasked_products(a: torch.Tensor, b: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """(aᵀb).view(-1)[flat]: one GEMM over the smallest box holding the entries when it is small enough
    (`box_products`), else gathered dot products. The same inputs give the same values."""
    if flat.numel() == 0:
        return a.new_empty(0)
    boxed = box_products(a, b, flat)
    return gathered_products(a, b, flat) if boxed is None else boxed


def box_products(a: torch.Tensor, b: torch.Tensor, flat: torch.Tensor) -> torch.Tensor | None:
    """(aᵀb).view(-1)[flat] by one GEMM over the smallest box holding the entries (their rows x all columns,
    or their rows x their columns) when it is at most `BOX_FACTOR` (native dot products: `BOX_FACTOR_NATIVE`)
    times their number; None when the entries are too scattered for that (the caller gathers them)."""
    n = flat.numel()
    factor = BOX_FACTOR_NATIVE if _native_dots(a, b) else BOX_FACTOR
    cols = b.shape[1]
    rows, row_at = index_set(flat // cols, a.shape[1])
    if rows.numel() * cols <= factor * n:
        return a.index_select(1, rows).t().mm(b)[row_at, flat % cols]
    columns, column_at = index_set(flat % cols, cols)
    if rows.numel() * columns.numel() <= factor * n:
        return a.index_select(1, rows).t().mm(b.index_select(1, columns))[row_at, column_at]
    return None


def gathered_products(a: torch.Tensor, b: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """(aᵀb).view(-1)[flat] for flat indices in any order (see `sampled_products`)."""
    cols = b.shape[1]
    order = torch.argsort(flat)
    ordered = flat[order]
    out = torch.empty(flat.numel(), dtype=a.dtype, device=a.device)
    out[order] = sampled_products(a, b, ordered // cols, ordered % cols)
    return out


def sampled_products(
    a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """(aᵀb)[rows, cols] for (row, col) pairs sorted row-major, without computing aᵀb: one dot product over T
    per pair, `a` (T x rows) and `b` (T x cols). Each value depends only on its own pair.

    Native kernels, one fixed order of summing (the same values from either, so a value never depends on
    the other pairs): few pairs are read token by token from `a` and `b` as stored (~0.3 ns per pair and
    token while the two sit in cache, ~5 ns once they do not; 1 thread, AVX-512 gathers); many, as dot
    products over contiguous copies of just the columns they read (~25 ns per pair at T = 512, plus the copy:
    `native.gather_columns`, ~0.5-0.7 ns per copied element in cache, ~5 ns out of it, about half of
    index_select + transpose; `pair_factor` draws the line). Torch code:
    `torch.sparse.sampled_addmm` over aᵀ (~40 ns per pair, ~400 for a call of 1,000 pairs). The native and
    torch values sum in different orders, so they can differ in the last bits."""
    n = rows.numel()
    if n == 0:
        return a.new_empty(0)
    if _native_dots(a, b):
        used_rows, row_at = index_set(rows, a.shape[1])
        used_cols, col_at = index_set(cols, b.shape[1])
        rows_contiguous = a.stride(1) == b.stride(1) == 1  # what both native readers need
        if rows_contiguous and n < pair_factor(a, b) * (used_rows.numel() + used_cols.numel()):
            return native.pair_dots(a, b, rows, cols)  # cheaper than copying the columns they read
        if rows_contiguous:  # the columns that pairs read, as rows: one tiled pass each
            a_used, b_used = native.gather_columns(a, used_rows), native.gather_columns(b, used_cols)
        else:
            a_used = a.index_select(1, used_rows).t().contiguous()
            b_used = b.index_select(1, used_cols).t().contiguous()
        return native.gathered_dots(a_used, b_used, row_at, col_at)
    a_t = a.t().contiguous()  # sampled_addmm reads aᵀ by rows: 2x faster than through a strided view
    height = a_t.shape[0]
    crow = torch.zeros(height + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=height).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            crow, cols, a_t.new_zeros(n), (height, b.shape[1]), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern, a_t, b, beta=0.0).values()


def pair_factor(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pairs per used column (of `a` and `b` together) below which `sampled_products` reads the pairs in
    place: `PAIR_FACTOR` while the operands fit in `PAIR_CACHE_BYTES`, else `PAIR_FACTOR_LARGE`."""
    large = a.element_size() * a.shape[0] * (a.shape[1] + b.shape[1]) > PAIR_CACHE_BYTES
    return PAIR_FACTOR_LARGE if large else PAIR_FACTOR


def index_set(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.unique(x, return_inverse=True)` for indices in [0, size): the native kernel counts instead of
    sorting (the same two tensors). torch.unique sorts, ~48 ns an index at 16K indices here, against ~2 for
    the count; below `INDEX_SET_MIN` indices its lower fixed cost wins (`benchmarks/bench_products.py`).

    Example:
        >>> [t.tolist() for t in index_set(torch.tensor([5, 1, 5, 3]), 8)]
        [[1, 3, 5], [2, 0, 2, 1]]
    """
    if (
        x.numel() >= INDEX_SET_MIN
        and native.library() is not None
        and x.device.type == "cpu"
        and x.dtype == torch.long
    ):
        return native.index_set(x, size)
    return torch.unique(x, return_inverse=True)


def _native_dots(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        native.library() is not None
        and a.dtype == b.dtype == torch.float32
        and a.device.type == b.device.type == "cpu"
    )


def bounded_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor,
    unmasked: torch.Tensor,
    excluded: torch.Tensor,
    tau: float,
    top: StreamingTopK,
    scorer: TensorScorer,
    offset: int,
    norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    previous_tau: float | None = None,
) -> tuple[int, torch.Tensor]:
    """The layer kernel, for dW = aᵀb (`weight`: rows x cols, starting at global index `offset`): push into
    `top` every masked entry whose D3 bound reaches `tau`, with its exact score and gradient (the payload),
    and return (masked entries verified, the gradient at `unmasked`, flat indices in their order).

    `excluded` is `unmasked` sorted, plus any entries to leave to the caller (a tied table's token rows:
    `bounded_tied`); `scorer` is a D3 `TensorScorer` with `keep_grads` (it scores the row blocks computed by
    GEMM). `tau` <= TINY verifies every entry. No aᵀb-sized tensor is allocated.
    `previous_tau`: this layer was scored with it before (same a, b, weight and set): push only the entries
    that the lower `tau` adds, so none enters `top` twice.

    Example:
        >>> a, b, w = torch.randn(8, 3), torch.randn(8, 4), torch.randn(3, 4)
        >>> top, scorer = StreamingTopK(2), TensorScorer(d3_scores, keep_grads=True)
        >>> n, kept = bounded_weight_grad(a, b, w, torch.tensor([0]), torch.tensor([0]), 0.0, top, scorer, 0)
        >>> n, torch.allclose(kept, (a.t() @ b).view(-1)[:1], atol=1e-6)
        (11, True)
    """
    eps, exp = scorer.d3
    rows, cols = weight.shape
    w = weight.detach()
    if tau <= TINY and previous_tau is None:  # every entry from GEMM rows, the unmasked ones' values too
        found: list[torch.Tensor] = []
        verified = _dense_rows(a, b, w, 0, rows, excluded, top, scorer, offset, found)
        at_excluded = torch.cat(found) if found else a.new_empty(0)  # in `excluded`'s order
        return verified, at_excluded[torch.searchsorted(excluded, unmasked)]
    # Scattered unmasked entries wait for the candidates: one gathered call for both reads (and, natively,
    # copies) each used column once, not twice. Each value depends only on its own pair, so nothing changes.
    kept = box_products(a, b, unmasked) if unmasked.numel() else a.new_empty(0)
    an, bn = (group_norms(a, GROUPS), group_norms(b, GROUPS)) if norms is None else norms
    cut = tau / slack(a.shape[0]) if tau > TINY else 0.0
    prev_cut = None if previous_tau is None else previous_tau / slack(a.shape[0])
    block_rows = max(1, BLOCK_ENTRIES // cols)
    found, verified = [], 0
    bound = torch.empty(min(block_rows, rows) * cols, device=w.device)
    scratch = torch.empty_like(bound)
    for r0 in range(0, rows, block_rows):
        r1 = min(r0 + block_rows, rows)
        n = (r1 - r0) * cols
        hits = _block_hits(an, bn, w, r0, r1, cut, eps, exp, bound, scratch)
        done = excluded
        if prev_cut is not None:
            old = _block_hits(an, bn, w, r0, r1, prev_cut, eps, exp, bound, scratch)
            if old.numel() > DENSE_FRACTION * n:
                continue  # scored whole by GEMM the first time
            done = torch.unique(torch.cat([excluded, old + r0 * cols]))  # sorted
            hits = hits[~torch.isin(hits, old, assume_unique=True)]
        if hits.numel() > DENSE_FRACTION * n:  # the bound prunes poorly here: one GEMM is cheaper
            verified += _dense_rows(a, b, w, r0, r1, done, top, scorer, offset)
        elif hits.numel():
            found.append(hits + r0 * cols)
    cand = torch.cat(found) if found else excluded.new_empty(0)
    if cand.numel() and excluded.numel():  # already unmasked: not candidates
        pos = torch.searchsorted(excluded, cand).clamp_(max=excluded.numel() - 1)
        cand = cand[excluded[pos] != cand]
    if kept is None:
        both = gathered_products(a, b, torch.cat([unmasked, cand]))
        kept, grads = both[: unmasked.numel()], both[unmasked.numel() :]
    elif cand.numel():
        grads = sampled_products(a, b, cand // cols, cand % cols)
    if cand.numel():
        scores = d3_scores(grads, w.reshape(-1)[cand], eps, exp)
        top.push_candidates(scores, cand + offset, grads)  # NaN scores (NaN weights) are dropped there
    return verified + cand.numel(), kept


def _block_hits(
    an: torch.Tensor,
    bn: torch.Tensor,
    w: torch.Tensor,
    r0: int,
    r1: int,
    cut: float,
    eps: float,
    exp: float,
    bound: torch.Tensor,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """Sorted block-local positions of rows [r0, r1) whose bound / (|θ| + ε)^exp may reach `cut` (a superset:
    the cut is lowered by 1e-5, which covers the roundings of the comparison below).

    The bound of a row block is one small GEMM (rows x G)(G x cols). No division for the usual exponents:
    exp = 0 compares the bound itself; exp = 1 compares bound - cut·|θ| with cut·ε (3 passes over the block,
    the weight read once)."""
    cols = w.shape[1]
    n = (r1 - r0) * cols
    if cut <= 0.0:
        return torch.arange(n, device=w.device)
    low = cut * (1 - 1e-5)
    if (
        exp in (0.0, 1.0)
        and native.library() is not None
        and native.takes(an, bn, w)
        and an.stride(1) == 1
        and bn.is_contiguous()
        and w.is_contiguous()
    ):  # the same comparisons, fused: no bound block written and read back
        hits = native.bound_hits(an, bn, w, r0, r1, exp, low, low if exp == 0 else low * eps)
        if hits is not None:
            return hits
    block = torch.mm(an[:, r0:r1].t(), bn, out=bound[:n].view(r1 - r0, cols)).view(-1)
    if exp == 0:
        values, level = block, low
    elif exp == 1:
        values, level = block.sub_(torch.abs(w[r0:r1].reshape(-1), out=scratch[:n]), alpha=low), low * eps
    else:
        values, level = d3_scores(block, w[r0:r1].reshape(-1), eps, exp, out=scratch[:n]), low
    hits = at_least(values, level) if n >= 4 * selection.BLOCK else None
    return (values >= level).nonzero().view(-1) if hits is None else hits


def _dense_rows(
    a: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    r0: int,
    r1: int,
    excluded: torch.Tensor,
    top: StreamingTopK,
    scorer: TensorScorer,
    offset: int,
    values: list | None = None,
) -> int:
    """Rows [r0, r1) of dW = aᵀb by one GEMM, scored into `top` like any dense gradient (zeros included, so
    nothing is owed when fewer than k scores are positive). Returns the masked entries verified; with a list
    `values`, appends the GEMM's values at the `excluded` entries of these rows (in `excluded`'s order)."""
    cols = w.shape[1]
    lo, hi = torch.searchsorted(
        excluded, torch.tensor([r0 * cols, r1 * cols], device=excluded.device)
    ).tolist()
    step = max(1, selection.SCORE_CHUNK // cols)
    for s0 in range(r0, r1, step):  # a GEMM row block at a time: O(chunk) memory for any layer
        s1 = min(s0 + step, r1)
        e0, e1 = torch.searchsorted(
            excluded, torch.tensor([s0 * cols, s1 * cols], device=excluded.device)
        ).tolist()
        with _gemm_threads():
            block = a[:, s0:s1].t().mm(b)
        if values is not None:
            values.append(block.view(-1)[excluded[e0:e1] - s0 * cols])
        push_block(top, scorer, block, w[s0:s1], offset + s0 * cols, excluded[e0:e1] - s0 * cols)
    return (r1 - r0) * cols - (hi - lo)


def push_block(
    top: StreamingTopK,
    scorer: TensorScorer,
    grad: torch.Tensor,
    weight: torch.Tensor,
    offset: int,
    excluded: torch.Tensor,
) -> None:
    """`scorer.push_flat(top, grad, weight, offset, excluded)` for a contiguous block, by the native kernel
    when it applies: once `top` is full only entries >= its k-th value can enter, and the kernel scores the
    block in one pass and hands over just those (the same scores and gradients, so the same top-k). Otherwise,
    or if the kernel declines the block (too many candidates, a non-finite score), the torch code."""
    eps, exp = scorer.d3
    if (
        top.full
        and exp in (0.0, 1.0)
        and scorer.inv_scale == 1.0
        and native.library() is not None
        and native.takes(grad, weight)
        and grad.is_contiguous()
        and weight.is_contiguous()
    ):
        found = native.score_block(grad, weight, excluded, exp, eps, top.kth, max(NATIVE_CAP, top.k))
        if found is not None:
            position, score, value = found
            top.push_candidates(score, position + offset, value)
            return
    scorer.push_flat(top, grad, weight, offset, excluded)


# ------------------------------------------------------------------------------------------ the backward pass
@dataclass
class _Kept:
    """A layer scored with τ above the running cut: what is needed to score it again."""

    name: str
    tau: float
    a: torch.Tensor
    b: torch.Tensor
    weight: torch.Tensor
    excluded: torch.Tensor  # the entries scored elsewhere: unmasked ones (and a tied table's token rows)


@dataclass
class _Pass:
    """One step's bounded scoring: the running top-k of verified entries (payload: their gradient). The
    scan pushes the other tensors into the same top-k at `step()`."""

    k: int
    tau_guess: float
    top: StreamingTopK
    scorer: TensorScorer
    seen: set = field(default_factory=set)
    kept: list = field(default_factory=list)
    verified: int = 0
    masked: int = 0
    dense_entries: int = 0  # entries of the layers scored whole by GEMM rows (few live tokens)
    recomputed: bool = False
    probe: str | None = None  # a probe step of the branch costs: the branch every layer takes


class BoundedGrads:
    """The replaced forward of the bounded layers and the scoring state of the current step.

    `layers`: parameter name -> (module, kind), kind "linear" (W: out x in, dW = gᵀh) or "conv1d"
    (transformers' Conv1D, W: in x out, dW = hᵀg). `entries_wanted()` gives the step's k. `tied`: a
    `bounded_tied.TiedOutputRows` for the layers whose weight is also an input embedding table (their token
    rows are scored with both contributions at `finish_backward`).
    """

    def __init__(
        self,
        layers: Mapping[str, tuple[nn.Module, str]],
        unmasked: UnmaskedSet,
        offsets: Mapping[str, int],
        sorted_unmasked: Callable[[str], torch.Tensor],
        make_scorer: Callable[[], TensorScorer],
        entries_wanted: Callable[[], int],
        tied=None,
        costs: BranchCosts | None = None,
    ) -> None:
        self.layers = dict(layers)
        self.costs = BranchCosts() if costs is None else costs  # GEMM rows or the bound, per layer
        self.tied = tied
        self.unmasked, self.offsets, self.sorted_unmasked = unmasked, offsets, sorted_unmasked
        self.make_scorer = make_scorer  # a D3 TensorScorer with keep_grads (the scan's, with its buffer)
        self.entries_wanted = entries_wanted
        self.last_cut: float | None = None  # the previous step's k-th score; τ_guess = MARGIN x it
        self.current: _Pass | None = None
        self.uncertified_steps = 0
        self.steps = 0
        self.survivors = 0.0  # sum over steps of the fraction of masked entries verified
        self.last_step: dict = {}  # the last scoring step's k, survivor fraction and certification
        self._log = {"steps": 0, "survivors": 0.0}
        # Uses of each layer in this step's forward before its backward began (see `_forward`).
        self.forwards: dict[str, int] = {}
        self.demoted: set[str] = set()  # layers found to run twice per step: dense gradients from then on
        self._saved_forward = []
        for name, (module, kind) in self.layers.items():
            self._saved_forward.append((module, module.__dict__.get("forward")))
            module.forward = self._forward(name, module, kind, module.forward)

    def remove(self) -> None:
        for module, previous in self._saved_forward:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._saved_forward, self.current = [], None
        if self.tied is not None:
            self.tied.remove()

    def _forward(self, name: str, module: nn.Module, kind: str, forward: Callable) -> Callable:
        # The module's own forward is replaced, not hooked: a hook would run after the product is computed.
        def bounded_forward(input: torch.Tensor) -> torch.Tensor:
            weight = module.weight
            if (
                name in self.demoted
                or not (torch.is_grad_enabled() and weight.requires_grad)
                or torch.is_autocast_enabled(input.device.type)
            ):
                return forward(input)  # autograd's own dense gradient; the scan scores p.grad as usual
            if _counts_as_a_use(self.current):
                self.forwards[name] = self.forwards.get(name, 0) + 1
                if self.forwards[name] > 1 and not (self.tied is not None and name in self.tied.tables):
                    self.demote(name)
                    return forward(input)
            return _BoundedLinear.apply(input, weight, module.bias, (self, name, kind))

        return bounded_forward

    def demote(self, name: str) -> None:
        """`name` runs twice in one step's forward (a shared layer, as in ALBERT, or two forwards before one
        backward): the bound covers one product, not a sum, so its weight takes autograd's dense gradient
        from now on, this step's first use included (`_BoundedLinear.backward`). Exact either way."""
        self.demoted.add(name)
        self.layers.pop(name, None)
        self.unmasked.grad_stash.pop(name, None)
        warnings.warn(
            f"weight_grads: {name} runs more than once per step (a shared layer?); its weight gets dense "
            "gradients from now on (the same selection, a slower backward).",
            stacklevel=3,
        )

    # ------------------------------------------------------------------------------------------ in backward
    def current_pass(self) -> _Pass:
        """The scoring of the step in progress (begun by its first bounded backward, or by `step()`)."""
        if self.current is None:
            k = self.entries_wanted()
            tau = 0.0 if self.last_cut is None else MARGIN * self.last_cut
            scorer = self.make_scorer()
            probe = self.costs.probe_branch() if k > 0 and tau > TINY else None
            self.current = _Pass(k, tau, StreamingTopK(max(k, 0)), scorer, probe=probe)
            for name in self.layers:
                self.unmasked.grad_stash.pop(name, None)
        return self.current

    def on_backward(self, name: str, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> None:
        """A bounded layer's weight gradient aᵀb: score it into the pass, stash its unmasked entries' values."""
        bp = self.current_pass()
        if name in bp.seen:
            raise RuntimeError(
                f"weight_grads='bounded': {name} received a second backward before engine.step() (gradients "
                "accumulate over backwards: the bound covers one). Call engine.step() after each backward, or set "
                "ID3Config(weight_grads='dense')."
            )
        bp.seen.add(name)
        idx, excluded = self.unmasked.indices[name], self.sorted_unmasked(name)
        if self.tied is not None and name in self.tied.tables:  # its token rows wait for the embedding's
            idx, excluded = self.tied.on_head_backward(name, a, b, idx, excluded)
        if bp.k <= 0:  # nothing to select: only the unmasked entries' gradient
            kept = unmasked_products(a, b, idx)
            self.unmasked.grad_stash[name] = kept.to(weight.dtype)
            return
        running = bp.top.values[-1].item() if bp.top.full else INELIGIBLE  # stale-low until merged: safe
        tau, norms = max(bp.tau_guess, running), None
        started = time.perf_counter()
        if self.costs.branch(name, a.shape[0], bp.probe) == "rows":
            tau = 0.0  # GEMM rows over the live tokens: every entry verified
        else:
            norms = (group_norms(a, GROUPS), group_norms(b, GROUPS))
            if not math.isfinite(norms[0].sum().item() + norms[1].sum().item()):
                tau = 0.0  # non-finite gradients: every entry scored (they turn ineligible, as on the dense path)
        if tau <= TINY:
            bp.dense_entries += weight.numel()
        verified, kept = bounded_weight_grad(
            a, b, weight, idx, excluded, tau, bp.top, bp.scorer, self.offsets[name], norms
        )
        if bp.probe is not None:
            branch = "rows" if tau <= TINY else "bound"
            self.costs.record(name, branch, a.shape[0], time.perf_counter() - started)
        self.unmasked.grad_stash[name] = kept.to(weight.dtype)
        bp.verified += verified
        bp.masked += weight.numel() - excluded.numel()
        if tau > TINY and tau > running:  # unconfirmed: keep what re-scoring needs until the cut reaches tau
            bp.kept.append(_Kept(name, tau, a, b, weight, excluded))
        if bp.kept and bp.top.full:
            reached = bp.top.values[-1].item()
            bp.kept = [kept for kept in bp.kept if kept.tau > reached]

    # ------------------------------------------------------------------------------------------ at step()
    def finish_backward(self) -> None:
        """Before selection: score what backward left to the end (a tied table's token rows)."""
        if self.tied is not None and self.current is not None:
            self.tied.finish(self.current)

    def certify(self, top: StreamingTopK) -> None:
        """With every tensor scored into `top` (the pass's): score again, with τ = the final cut, each kept
        layer whose τ that cut did not reach. Afterwards every unverified entry scores below the cut."""
        bp = self.current
        if bp is None or not bp.kept:
            return
        cut = top.threshold()
        redo = [kept for kept in bp.kept if kept.tau > cut]
        bp.kept = []
        if redo:
            bp.recomputed = True
        tau = cut if cut > TINY else 0.0
        with _threads(THREADS):
            for kept in redo:  # only entries with bound in [cut, kept.tau) are new (`previous_tau`)
                started = time.perf_counter()
                verified, _ = bounded_weight_grad(
                    kept.a,
                    kept.b,
                    kept.weight,
                    kept.excluded[:0],
                    kept.excluded,
                    tau,
                    top,
                    bp.scorer,
                    self.offsets[kept.name],
                    previous_tau=kept.tau,
                )
                bp.verified += verified
                if bp.probe is not None:
                    self.costs.add_rescoring(kept.name, time.perf_counter() - started)

    def grads_for(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """Gradient values of entries `local` of `name` selected this step (all among the pass's top-k)."""
        values, index = self.current.top.result()
        payload = self.current.top.result_payload()
        want = local + self.offsets[name]
        order = torch.argsort(index)
        pos = torch.searchsorted(index[order], want).clamp_(max=max(index.numel() - 1, 0))
        if index.numel() == 0 or not bool((index[order][pos] == want).all()):
            raise RuntimeError(f"weight_grads='bounded': a selected entry of {name} was never verified")
        return payload[order][pos]

    def end_step(self, cut: float | None) -> None:
        """Close the step: remember its cut (the next τ_guess), count certification and survivors."""
        bp, self.current = self.current, None
        self.forwards = {}
        if self.tied is not None:
            self.tied.reset()
        if bp is None:
            return
        if cut is not None and math.isfinite(cut):
            self.last_cut = cut
        if bp.k > 0 and bp.seen:
            self.costs.end_step(bp.probe)
            self.steps += 1
            self.uncertified_steps += int(bp.recomputed)
            fraction = bp.verified / max(bp.masked, 1)
            total = sum(module.weight.numel() for module, _ in self.layers.values())
            self.last_step = {
                "k": bp.k,
                "survivors": fraction,
                "uncertified": bp.recomputed,
                "dense": bp.dense_entries / max(total, 1),  # share of entries scored whole by GEMM rows
            }
            self.survivors += fraction
            self._log["steps"] += 1
            self._log["survivors"] += fraction

    def log_metrics(self) -> dict[str, float]:
        steps = self._log["steps"]
        out = {"id3/uncertified_steps": self.uncertified_steps}
        if steps:
            out["id3/bound_survivors"] = self._log["survivors"] / steps
        self._log = {"steps": 0, "survivors": 0.0}
        return out


def _counts_as_a_use(current: _Pass | None) -> bool:
    """Whether a forward of a bounded layer is a use of it in this step: before the step's backward began,
    and not a recomputation inside backward (activation checkpointing re-runs forwards there)."""
    in_backward = getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1
    return current is None and not in_backward


@contextlib.contextmanager
def _threads(n: int):
    """torch's intra-op threads set to `n` (if fewer than now) for the block, restored after."""
    before = torch.get_num_threads()
    if n >= before:
        yield
        return
    torch.set_num_threads(n)
    _OUTER_THREADS.append(before)
    try:
        yield
    finally:
        _OUTER_THREADS.pop()
        torch.set_num_threads(before)


_OUTER_THREADS: list[int] = []  # the thread counts `_threads` lowered, innermost last


@contextlib.contextmanager
def _gemm_threads():
    """Inside `_threads`: the threads it took away, back for one large GEMM (no barrier-bound small ops)."""
    if not _OUTER_THREADS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(_OUTER_THREADS[-1])
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _BoundedLinear(torch.autograd.Function):
    """`F.linear` (or Conv1D's addmm) whose weight gradient goes to `BoundedGrads.on_backward`; dX and the
    bias gradient are autograd's products."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, owner: tuple):
        ctx.save_for_backward(input, weight)
        ctx.owner = owner
        if owner[2] == "linear":
            return F.linear(input, weight, bias)
        shape = input.shape[:-1] + (weight.shape[1],)
        flat = input.reshape(-1, input.shape[-1])
        out = flat.mm(weight) if bias is None else torch.addmm(bias, flat, weight)
        return out.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        input, weight = ctx.saved_tensors
        bounded, name, kind = ctx.owner
        g = grad_out.reshape(-1, grad_out.shape[-1])
        h = input.reshape(-1, input.shape[-1])
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (g.mm(weight) if kind == "linear" else g.mm(weight.t())).view(input.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(tuple(range(grad_out.dim() - 1)))
        if name in bounded.demoted:  # a use recorded before the layer was found to run twice: dense dW
            return grad_input, (g.t().mm(h) if kind == "linear" else h.t().mm(g)), grad_bias, None
        with torch.no_grad(), _threads(THREADS):
            keep = live_tokens(g, h)
            if keep is not None:  # tokens that add exact zeros to every product (padding, unpooled positions)
                g, h = g.index_select(0, keep), h.index_select(0, keep)
            if kind == "linear":
                bounded.on_backward(name, g, h, weight)
            else:
                bounded.on_backward(name, h, g, weight)
        return grad_input, None, grad_bias, None


def bounded_layers(
    model: nn.Module,
    selectable: Mapping[str, nn.Parameter],
    tied_heads: Mapping[str, nn.Module] | None = None,
) -> tuple[dict, list[str]]:
    """({weight name: (module, kind)} for the selectable weights the bounded path can take over, reasons for
    the large selectable Linear-like weights it cannot). `tied_heads`: weight name -> the output nn.Linear
    of a table tied to input embeddings that `bounded_tied` completes (see `tied_output_heads`)."""
    names = {id(p): n for n, p in selectable.items()}
    holders: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    layers, skipped = {}, []
    for module in model.modules():
        kind = "linear" if type(module) is nn.Linear else None
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            kind = "conv1d"
        weight = getattr(module, "weight", None)
        if kind is None or weight is None or id(weight) not in names:
            continue
        name = names[id(weight)]
        if weight.numel() < selection.BOUNDED_MIN_ENTRIES:
            continue
        if tied_heads and tied_heads.get(name) is module:
            layers[name] = (module, kind)
        elif holders[id(weight)] > 1:
            skipped.append(
                f"{name} is shared with another module (tied, and not as an input embedding plus one "
                "bias-free float32 output nn.Linear)"
            )
        elif weight.dtype != torch.float32:
            skipped.append(f"{name} is {weight.dtype} (float32 only)")
        else:
            layers[name] = (module, kind)
    return layers, skipped
