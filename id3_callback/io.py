"""File helpers: atomic writes (a reader sees the old file or the new one, never half of one), checksums."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable

import torch


def _sha(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes: deltas record it for the values they overwrite, `apply_delta` checks it."""
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Call `write(tmp_path)`, then rename the temp file over `path` (same folder, so the rename is atomic).

    The file gets the usual permissions (0666 minus the umask), not mkstemp's owner-only 0600.

    Example:
        >>> atomic_write("out/metrics.json", lambda tmp: open(tmp, "w").write("{}"))  # doctest: +SKIP
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
