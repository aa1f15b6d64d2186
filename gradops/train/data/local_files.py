"""Helpers of the data sets read from local files (``--data-root``): the one-line error for a
missing or incomplete directory, and ``.npy`` files checked for shape and dtype."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..config.errors import ConfigError

__all__ = ["missing_data", "missing_root", "bad_file", "require_dir", "load_npy", "numbered_npy",
           "root_key"]


def missing_data(data: str, root: str | Path, what: str, download: str, layout: str
                 ) -> ConfigError:
    """The error for a missing or incomplete data directory: what is missing, what to download,
    the expected layout and where to put it (one line)."""
    return ConfigError("--data-root", f"{data}: {what} under {root}. Download {download} and put "
                       f"it at --data-root so that it reads {layout}")


def missing_root(data: str, root: str | None, download: str, layout: str) -> ConfigError:
    """The error for a ``--data-root`` that is not a directory."""
    return ConfigError("--data-root", f"{data}: {root or repr('')} is not a directory. Download "
                       f"{download} and put it at --data-root so that it reads {layout}")


def bad_file(path: str | Path, problem: str) -> ConfigError:
    """The error for a file that exists but has the wrong content; it names the file."""
    return ConfigError("--data-root", f"{path}: {problem}")


def require_dir(path: Path, data: str, root: str | Path, download: str, layout: str) -> Path:
    """``path`` if it is a directory, else the :func:`missing_data` error."""
    if not path.is_dir():
        raise missing_data(data, root, f"no directory {path.name}/ (looked for {path})",
                           download, layout)
    return path


def load_npy(path: Path, shape: tuple[int | None, ...], kinds: str = "fiu") -> np.ndarray:
    """The array in ``path``, refused (naming the file) unless its shape matches ``shape``
    (``None``: any size) and its dtype kind is one of ``kinds`` (numpy's ``f``, ``i``, ``u``)."""
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise bad_file(path, f"not a readable .npy file ({type(e).__name__}: {e})") from e
    if a.dtype.kind not in kinds:
        raise bad_file(path, f"dtype {a.dtype} (expected one of kinds {kinds!r}: "
                       "f float, i int, u uint)")
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
        want = "x".join("*" if s is None else str(s) for s in shape)
        raise bad_file(path, f"shape {'x'.join(map(str, a.shape))} (expected {want})")
    return a


def numbered_npy(folder: Path) -> int:
    """The number of files ``0.npy .. N-1.npy`` in ``folder`` (counted from a listing); a gap is
    an error naming the first missing file."""
    names = [p.name for p in folder.glob("*.npy")]
    n = len(names)
    have = set(names)
    for i in range(n):
        if f"{i}.npy" not in have:
            raise bad_file(folder / f"{i}.npy", f"missing: {folder} holds {n} .npy files, "
                           f"numbered 0..{n - 1} in the expected layout")
    return n


def root_key(*paths: Path) -> str:
    """A short digest of the given files' absolute paths, sizes and modification times (part of
    the cache name of a data set built from them)."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
