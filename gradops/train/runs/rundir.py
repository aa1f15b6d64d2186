"""One owner per output directory, and the list of the files a run wrote.

:class:`DirLock` takes an exclusive ``fcntl.flock`` on ``DIR/.gradops.lock`` for as long as a
command writes ``DIR`` (``train``, ``train --resume``, ``compare``, ``recon``). The operating
system releases it when the process ends, however it ends, so a killed run leaves no stale lock;
a second writer is refused with the holder's PID (a :class:`ConfigError`, exit 2) before it has
written anything. Holding the lock, the owner removes the temporary files that killed writers
left (``.NAME.tmpPID``, the pattern of
:func:`gradops.train.config.atomic.atomic_write_bytes`, only in that directory).

:class:`Manifest` (``DIR/.gradops-manifest.json``) lists every file the run writes, recorded
before the file is first written, so that ``--overwrite`` removes exactly those (and never a
file the run did not write).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..config.atomic import atomic_write_text
from ..config.errors import ConfigError
from ..config.io_errors import annotate

__all__ = ["DirLock", "Manifest", "LOCK_FILE", "MANIFEST_FILE", "TEMP_PATTERN",
           "remove_temporaries", "probe_lock"]

LOCK_FILE = ".gradops.lock"
MANIFEST_FILE = ".gradops-manifest.json"
#: The temporary files of the atomic writer: ``.NAME.tmpPID``.
TEMP_PATTERN = re.compile(r"^\..+\.tmp\d+$")


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "PID unknown"


def _busy(d: Path, option: str, lock: Path) -> ConfigError:
    return ConfigError(option, f"{d} is in use by another gradops process ({_holder(lock)}); "
                       "wait for it to finish, or use another directory")


def probe_lock(d: Path, option: str = "--out") -> None:
    """Raise the "in use" error when another process holds ``d``'s lock (creates nothing)."""
    lock = Path(d) / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _busy(Path(d), option, lock) from None
        raise
    finally:
        os.close(fd)


def remove_temporaries(d: Path) -> list[str]:
    """Remove ``d``'s ``.NAME.tmpPID`` files (call only while holding ``d``'s lock); returns
    their names."""
    gone = []
    for p in Path(d).iterdir():
        if TEMP_PATTERN.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


class DirLock:
    """The exclusive lock of an output directory (see the module docstring).

    ``acquire()`` creates the directory when needed and remembers what it created, so that
    ``release(keep=False)`` of a run that wrote nothing removes it again."""

    def __init__(self, d: str | Path, option: str = "--out"):
        self.dir = Path(d)
        self.option = option
        self.fd: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> DirLock:
        if self.fd is not None:
            return self
        d = self.dir
        if d.exists() and not d.is_dir():
            raise ConfigError(self.option, f"{d} exists and is not a directory")
        missing = []
        p = d
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        d.mkdir(parents=True, exist_ok=True)
        self._created = missing       # innermost first
        lock = d / LOCK_FILE
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            self._remove_created()
            raise
        for attempt in range(20):     # a probe (probe_lock) holds a shared lock for moments
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or attempt == 19:
                    os.close(fd)
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise _busy(d, self.option, lock) from None
                    raise
                time.sleep(0.005)
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            data, done = f"{os.getpid()}\n".encode(), 0
            while done < len(data):       # a short write (a full disk) then fails with its cause
                with annotate(lock):
                    done += os.pwrite(fd, data[done:], done)
            remove_temporaries(d)
        except OSError:
            self.release(keep=False)
            raise
        return self

    def _remove_created(self) -> None:
        for p in self._created:
            try:
                p.rmdir()
            except OSError:
                break
        self._created = []

    def release(self, keep: bool = True) -> None:
        """Unlock. ``keep=False``: when the directory holds nothing but the lock and was created
        by :meth:`acquire`, remove it (a run refused before writing leaves nothing)."""
        if self.fd is None:
            return
        try:
            if not keep and self._created:
                names = {p.name for p in self.dir.iterdir()}
                if names <= {LOCK_FILE}:
                    (self.dir / LOCK_FILE).unlink(missing_ok=True)
                    self._remove_created()
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    @contextlib.contextmanager
    def holding(self) -> Iterator[DirLock]:
        """Release the lock when the block ends, wherever inside it the lock was taken: on
        success the directory is kept; on an exception ``release(keep=False)`` removes a
        directory that :meth:`acquire` created and nothing else wrote to."""
        try:
            yield self
        except BaseException:
            self.release(keep=False)
            raise
        self.release()

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(keep=exc_type is None)


class Manifest:
    """The files a run writes in its directory (``.gradops-manifest.json``, a sorted JSON list,
    written atomically). ``add`` records names before they are first written."""

    def __init__(self, d: str | Path):
        self.dir = Path(d)
        self.path = self.dir / MANIFEST_FILE
        self.names: set[str] = set()
        if self.path.is_file():
            try:
                names = json.loads(self.path.read_text())
                self.names = {str(n) for n in names if _plain_name(str(n))}
            except (ValueError, TypeError, OSError):
                self.names = set()

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def add(self, names: Iterable[str]) -> None:
        new = {n for n in names if n not in self.names}
        if not new and self.exists:
            return
        self.names |= new
        atomic_write_text(self.path, json.dumps(sorted(self.names)) + "\n")

    def remove_files(self, fallback: Iterable[str] = ()) -> list[str]:
        """Delete the recorded files (``fallback`` when there is no manifest: a directory of an
        older gradops) and empty the manifest; returns the names removed."""
        names = self.names if self.exists else {n for n in fallback if _plain_name(n)}
        gone = []
        for n in sorted(names):
            p = self.dir / n
            if p.is_file() or p.is_symlink():
                p.unlink()
                gone.append(n)
        self.names = set()
        self.path.unlink(missing_ok=True)
        return gone


def _plain_name(n: str) -> bool:
    """A file name directly in the directory (no path separators, not ``.``/``..``)."""
    return bool(n) and "/" not in n and "\\" not in n and n not in (".", "..", LOCK_FILE)
