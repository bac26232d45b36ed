"""Optional native kernels for the bounded path: plain C (native_kernels.c), compiled on first use, via ctypes.

Why not torch's cpp_extension: building with it takes about a minute here; this file compiles in about a
second with the system C compiler. The library is cached per user, keyed by the source, the flags, the
compiler and the CPU (`-march=native` code must not run on another CPU), and written under a temporary name,
then renamed into place, so a concurrent or interrupted build never leaves a broken one. Everything here is
optional: with `ID3_NATIVE=0`, no compiler, a failed build or tensors the kernels do not take (not float32 on
the CPU, not row-contiguous), the callers run their torch code: the same results bitwise for the live-token
scan and the scoring, the same up to fp32 rounding (another order of summing) for the bound branch's group
norms and gathered dot products (`bounded`'s docstring says why that keeps every step exact).

Example:
    >>> from id3_callback import native
    >>> native.live_rows(torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 3.0]]), torch.ones(3, 4), 1.0)  # doctest: +SKIP
    tensor([0, 2])
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native_kernels.c")
# No -ffast-math and no contraction into FMAs: each operation must round like torch's (bitwise scores).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")

_loaded: list = []  # [library or None] once a load was attempted: one attempt (and one warning) per process
_why_not: list = []  # why the load failed, for `status`
_warned: list = []  # [True] once the failed load was warned about

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "id3_live_rows": (_I64, [_P, _I64, _I64, _P, _I64, _I64, _I64, ctypes.c_double, _P]),
    "id3_score_block": (
        _I64,
        [_P, _P, _I64, _P, _I64, ctypes.c_int, ctypes.c_float, ctypes.c_float, _I64, _P, _P, _P],
    ),
    "id3_bound_hits": (
        _I64,
        [_P, _I64, _P, _I64, _I64, _P, _I64, _I64, ctypes.c_int, ctypes.c_float, ctypes.c_float, _P],
    ),
    "id3_gathered_dots": (None, [_P, _P, _I64, _P, _P, _I64, _P]),
    "id3_gather_columns": (None, [_P, _I64, _I64, _P, _I64, _P]),
    "id3_group_square_sums": (None, [_P, _I64, _I64, _I64, _I64, _P]),
    "id3_pair_dots": (None, [_P, _I64, _P, _I64, _I64, _P, _P, _I64, _P]),
    "id3_index_set": (_I64, [_P, _I64, _I64, _P, _P, _P]),
}


def library(warn: bool = True) -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled by `ID3_NATIVE=0`, or unavailable: then warned once).

    `warn=False` is the plan's probe for `weight_grads='auto'`, which then keeps dense gradients and has
    nothing to warn about; a later call that runs the torch code still warns."""
    if os.environ.get("ID3_NATIVE", "1") == "0":
        return None
    if not _loaded:
        _warned.clear()  # a new attempt (tests reset `_loaded`) warns anew
        try:
            _loaded.append(_load())
        except Exception as exc:  # never let an optional speed-up break training
            _why_not.append(str(exc))
            _loaded.append(None)
    if _loaded[0] is None and warn and not _warned:
        _warned.append(True)
        warnings.warn(
            f"id3_callback: native kernels unavailable ({_why_not[-1]}); the bounded path runs its torch code "
            "(same results, slower). Set ID3_NATIVE=0 to skip the attempt.",
            stacklevel=2,
        )
    return _loaded[0]


def status() -> str:
    """One line for the plan's summary: whether the bounded path runs its native kernels, and if not, why.

    Example:
        >>> status().startswith(("native kernels", "torch code"))
        True
    """
    if os.environ.get("ID3_NATIVE", "1") == "0":
        return "torch code (ID3_NATIVE=0)"
    if library() is None:
        return f"torch code (native kernels unavailable: {_why_not[-1] if _why_not else 'unknown'})"
    return "native kernels (plain C, compiled on first use)"


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                " ".join(FLAGS).encode(),
                version.encode(),
                _cpu_id().encode(),
                platform.machine().encode(),
            ]
        )
    ).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "id3_callback"
    target = cache / f"kernels-{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            done = subprocess.run(
                [compiler, *FLAGS, "-o", temp, str(SOURCE)], capture_output=True, text=True, timeout=120
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:500]}")
            os.chmod(temp, 0o755)
            os.replace(temp, target)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
    lib = ctypes.CDLL(str(target))
    for name, (result, args) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = result, args
    return lib


def takes(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can read these tensors in place: float32 on the CPU, rows contiguous."""
    return all(
        t.dtype == torch.float32 and t.device.type == "cpu" and (t.dim() < 2 or t.stride(-1) == 1)
        for t in tensors
    )


def live_rows(grad: torch.Tensor, other: torch.Tensor, enough: float) -> torch.Tensor | None:
    """`bounded.live_tokens` in one pass (None: keep every token). Needs `library()` and `takes(...)`."""
    tokens = grad.shape[0]
    keep = torch.empty(max(tokens, 1), dtype=torch.long)
    found = library().id3_live_rows(
        grad.data_ptr(), grad.stride(0), grad.shape[1], other.data_ptr(), other.stride(0), other.shape[1],
        tokens, enough, keep.data_ptr(),
    )  # fmt: skip
    return None if found < 0 else keep[:found]


def score_block(
    grad: torch.Tensor,
    weight: torch.Tensor,
    excluded: torch.Tensor,
    exp: float,
    eps: float,
    floor: float,
    cap: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(positions, D3 scores, gradients) of the eligible entries of a contiguous block scoring >= `floor`
    (exp 0 or 1), or None when over `cap` qualify or any score of the block is not finite (then the caller
    scores it the torch way, which also reports the non-finite one)."""
    n = grad.numel()
    pos = torch.empty(cap, dtype=torch.long)
    score, value = torch.empty(cap), torch.empty(cap)
    excluded = excluded.contiguous()
    found = library().id3_score_block(
        grad.data_ptr(), weight.data_ptr(), n, excluded.data_ptr(), excluded.numel(), int(exp), eps, floor, cap,
        pos.data_ptr(), score.data_ptr(), value.data_ptr(),
    )  # fmt: skip
    if found < 0:
        return None
    return pos[:found], score[:found], value[:found]


def bound_hits(
    an: torch.Tensor,
    bn: torch.Tensor,
    weight: torch.Tensor,
    r0: int,
    r1: int,
    exp: float,
    low: float,
    level: float,
) -> torch.Tensor | None:
    """`bounded._block_hits` for exp 0 or 1 in one pass, no bound-sized temporary: sorted block-local
    positions of rows [r0, r1) whose group bound reaches the level (None: over 64 groups, or no memory for
    the column norms). `bn` and `weight` contiguous. Rows whose largest possible bound stays below the level
    are skipped without reading them."""
    cols = weight.shape[1]
    pos = torch.empty((r1 - r0) * cols, dtype=torch.long)
    found = library().id3_bound_hits(
        an.data_ptr(), an.stride(0), bn.data_ptr(), bn.shape[0], cols, weight.data_ptr(), r0, r1, int(exp),
        low, level, pos.data_ptr(),
    )  # fmt: skip
    return None if found < 0 else pos[:found].clone()


def gathered_dots(
    a_t: torch.Tensor, b_t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """(aᵀb)[rows, cols] for pairs in any order, one dot product over T per pair (`bounded.sampled_products`),
    from the transposes: `a_t` (R x T) and `b_t` (C x T), contiguous, so each pair reads two contiguous runs.
    Summed in the kernel's fixed order, not sampled_addmm's."""
    if not (a_t.is_contiguous() and b_t.is_contiguous()):
        raise ValueError("gathered_dots takes contiguous transposes (x.t().contiguous()) of both operands")
    n, tokens = rows.numel(), a_t.shape[1]
    out = torch.empty(n, dtype=torch.float32)
    rows, cols = rows.contiguous(), cols.contiguous()
    library().id3_gathered_dots(
        a_t.data_ptr(), b_t.data_ptr(), tokens, rows.data_ptr(), cols.data_ptr(), n, out.data_ptr()
    )
    return out


def gather_columns(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`a.index_select(1, idx).t().contiguous()` in one tiled pass, for `a` (T x C) with rows contiguous and
    int64 indices in [0, C) (the caller's guarantee): the operand copies of `gathered_dots`, bitwise."""
    idx = idx.contiguous()
    tokens = a.shape[0]
    out = torch.empty(idx.numel(), tokens, dtype=torch.float32)
    library().id3_gather_columns(
        a.data_ptr(), a.stride(0), tokens, idx.data_ptr(), idx.numel(), out.data_ptr()
    )
    return out


def pair_dots(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(aᵀb)[rows, cols] for pairs in any order, read token by token from `a` (T x R) and `b` (T x C) as
    stored (rows contiguous): nothing transposed or copied. The values are `gathered_dots`' bitwise (the
    same order of sums), and each depends only on its own pair."""
    n, tokens = rows.numel(), a.shape[0]
    out = torch.empty(n, dtype=torch.float32)
    rows, cols = rows.to(torch.int32).contiguous(), cols.to(torch.int32).contiguous()
    library().id3_pair_dots(
        a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), tokens, rows.data_ptr(), cols.data_ptr(), n,
        out.data_ptr(),
    )  # fmt: skip
    return out


def group_square_sums(a: torch.Tensor, groups: int) -> torch.Tensor:
    """(groups x n) sums of squares of the columns of `a` (T x n, rows contiguous) over contiguous token
    groups, in one pass (`bounded.group_norms` without the squared copy and the GEMM)."""
    tokens, n = a.shape
    out = torch.empty(groups, n, dtype=torch.float32)
    library().id3_group_square_sums(a.data_ptr(), a.stride(0), tokens, n, groups, out.data_ptr())
    return out


def index_set(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.unique(x, return_inverse=True)` for int64 indices in [0, size), without a sort: (the distinct
    values ascending, each index's position among them). The caller guarantees the range."""
    x = x.contiguous()
    n = x.numel()
    # One allocation: values (n), inverse (n), then the kernel's scratch slots (size).
    buffer = torch.empty(max(size, 1) + 2 * n, dtype=torch.long)
    base = buffer.data_ptr()
    count = library().id3_index_set(x.data_ptr(), n, size, base + 16 * n, base, base + 8 * n)
    return buffer[:count], buffer[n : 2 * n].view(x.shape)
