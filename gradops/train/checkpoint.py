"""Checkpoints of a run: written atomically (a temporary file in the same directory, flushed
and fsync'ed, then renamed over the old one), read back with a clear error when corrupt."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_write_bytes", "atomic_write_text",
           "CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Save ``state`` as ``run_dir/checkpoint.pt`` atomically."""
    import io
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    path = Path(run_dir) / CHECKPOINT
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The state saved in ``run_dir/checkpoint.pt``; a missing or unreadable file is a
    :class:`ConfigError` of ``--resume``."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ConfigError("--resume", f"{run_dir} has no checkpoint ({CHECKPOINT}) to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (any failure to read it means a corrupt file)
        raise ConfigError("--resume", f"checkpoint {path} is corrupt or unreadable "
                          f"({type(e).__name__}); delete the run or start it again with "
                          "--overwrite") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError("--resume", f"checkpoint {path} is not a gradops trainer checkpoint "
                          f"(format {FORMAT})")
    return state
