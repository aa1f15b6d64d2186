"""Checkpoints of a run: written atomically (a temporary file in the same directory, flushed
and fsync'ed, then renamed over the old one; removed again on any failure), with a SHA-256 of
their bytes in the same file, checked before anything is loaded: a corrupt, truncated or
incomplete checkpoint is a one-line error naming the file, never a different run. The file stays
a plain ``torch.save`` archive (``torch.load`` reads it): the checksum is the archive's comment."""
from __future__ import annotations

import hashlib
import io
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from ..config.atomic import atomic_write_bytes
from ..config.errors import ConfigError

__all__ = ["save_checkpoint", "load_checkpoint", "restore_trainer", "CHECKPOINT", "MAGIC"]

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
#: A checkpoint file is ``torch.save``'s zip archive whose comment is ``MAGIC`` + the SHA-256 (hex)
#: of the archive as ``torch.save`` wrote it (with an empty comment).
MAGIC = b"gradops-sha256:"
_EOCD = b"PK\x05\x06"
_HEX = 64
#: The keys every checkpoint's state has (and those of its ``trainer`` entry).
_KEYS = ("epoch", "trainer", "history", "config")
_TRAINER_KEYS = ("model", "optimizer", "rng")


def _eocd_ok(data: bytes, comment_len: int) -> bool:
    """Whether ``data`` ends with a zip end-of-central-directory record whose comment (the
    file's last ``comment_len`` bytes) has that length."""
    n = 22 + comment_len
    return len(data) >= n and data[-n:-n + 4] == _EOCD and \
        struct.unpack("<H", data[-comment_len - 2:len(data) - comment_len])[0] == comment_len


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Save ``state`` as ``run_dir/checkpoint.pt`` atomically, with its checksum (the SHA-256 of
    the ``torch.save`` bytes, kept in the zip archive's comment: ``torch.load`` still reads the
    file as it is)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    payload = buf.getvalue()
    if not _eocd_ok(payload, 0):
        raise RuntimeError("save_checkpoint: torch.save wrote no plain zip archive")
    comment = MAGIC + hashlib.sha256(payload).hexdigest().encode()
    path = Path(run_dir) / CHECKPOINT
    atomic_write_bytes(path, payload[:-2] + struct.pack("<H", len(comment)) + comment)
    return path


def _corrupt(path: Path, why: str) -> ConfigError:
    return ConfigError("--resume", f"checkpoint {path} {why}; the run cannot continue from it: "
                       f"start it again with gradops train --out {path.parent} --overwrite "
                       "(the files were left as they are)")


def _payload(path: Path, data: bytes) -> bytes:
    """The checked ``torch.save`` bytes of a checkpoint file's bytes."""
    n = len(MAGIC) + _HEX
    if _eocd_ok(data, 0) and data.startswith(b"PK\x03\x04"):   # an older gradops: no checksum
        print(f"gradops: warning: checkpoint {path} has no checksum (written by an older "
              "gradops); loading it unchecked", file=sys.stderr)
        return data
    if not (_eocd_ok(data, n) and data[-n:].startswith(MAGIC)):
        raise _corrupt(path, "is damaged or truncated (no checksum record at its end)")
    payload = data[:-n - 2] + b"\x00\x00"
    if hashlib.sha256(payload).hexdigest().encode() != data[-_HEX:]:
        raise _corrupt(path, "does not match its checksum (corrupt)")
    return payload


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The state saved in ``run_dir/checkpoint.pt`` (checksum and keys checked); a missing,
    corrupt or incomplete file is a :class:`ConfigError` of ``--resume``."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ConfigError("--resume", f"{run_dir} has no checkpoint ({CHECKPOINT}) to resume "
                          "from (killed before its first checkpoint?); start it again with "
                          f"gradops train --out {run_dir} --overwrite")
    data = path.read_bytes()
    payload = _payload(path, data)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (any failure to read it means a corrupt file)
        raise _corrupt(path, f"is unreadable ({type(e).__name__})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError("--resume", f"checkpoint {path} is not a gradops trainer checkpoint "
                          f"(format {FORMAT})")
    missing = [k for k in _KEYS if k not in state]
    if not missing and isinstance(state["trainer"], dict):
        missing = [f"trainer.{k}" for k in _TRAINER_KEYS if k not in state["trainer"]]
    elif not missing:
        missing = ["trainer (not a dictionary)"]
    if missing:
        raise _corrupt(path, f"is incomplete (no {', '.join(missing)})")
    if isinstance(state["epoch"], bool) or not isinstance(state["epoch"], int) \
            or state["epoch"] < 1:
        raise _corrupt(path, f"has an invalid epoch {state['epoch']!r}")
    return state


def restore_trainer(trainer: Any, state: dict[str, Any], run_dir: Path) -> None:
    """``trainer.load_state_dict(state["trainer"])``, a state that does not fit the run's model
    or optimizer being the same one-line error as a corrupt file."""
    try:
        trainer.load_state_dict(state["trainer"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
        msg = " ".join(str(e).split())
        raise _corrupt(Path(run_dir) / CHECKPOINT, "does not fit this run "
                       f"({type(e).__name__}: {msg[:200]})") from e
