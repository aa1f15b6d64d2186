"""The on-disk cache of built data sets: atomic writes, a SHA-256 beside each file, rebuilt when
missing or corrupt. The cache is an optimisation: when it cannot be written (read-only, full, its
path a file) a warning says so, once per directory, and the data set built in memory is used.

Location: ``$GRADOPS_DATA_CACHE`` if set, else ``$XDG_CACHE_HOME/gradops``, else
``~/.cache/gradops``.
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from ..config.atomic import atomic_write_bytes
from ..config.io_errors import describe_os_error

__all__ = ["cache_dir", "cached_arrays"]


def cache_dir() -> Path:
    """The directory built data sets are cached in (created on first use)."""
    env = os.environ.get("GRADOPS_DATA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradops"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _load(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays in ``path`` if it and its checksum file agree, else None."""
    sums = path.with_name(path.name + ".sha256")
    try:
        data = path.read_bytes()
        want = sums.read_text().strip()
    except OSError:
        return None
    if _sha256(data) != want:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError):
        return None


def cached_arrays(name: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays cached as ``name`` (``<cache>/<name>.npz``), built with ``build()`` and written
    (atomically, with a ``.sha256`` beside it) when the file is missing, unreadable or does not
    match its checksum."""
    d = cache_dir()
    path = d / f"{name}.npz"
    if path.exists():
        arrays = _load(path)
        if arrays is not None:
            return arrays
        print(f"gradops: cached data set {path} is corrupt or incomplete; rebuilding it",
              file=sys.stderr)
    arrays = build()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    try:
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        atomic_write_bytes(path.with_name(path.name + ".sha256"), (_sha256(data) + "\n").encode())
    except OSError as e:     # the cache is an optimisation: train from memory, say so once
        _warn_unwritable(d, e)
    return arrays


_warned: set[str] = set()


def _warn_unwritable(d: Path, e: OSError) -> None:
    if str(d) in _warned:
        return
    _warned.add(str(d))
    print(f"gradops: warning: cannot write the data cache ({describe_os_error(e)}); using the "
          "data set built in memory (set GRADOPS_DATA_CACHE to a writable directory to cache "
          "it)", file=sys.stderr)
