"""I/O failures as one line: which path, what went wrong, what to do (the commands print it on
stderr and exit with status 2, as for bad input).

A write that fails (a read-only file system, a full disk or quota, no permission, a file-size
limit) raises :class:`OSError`; :func:`annotate` gives it the path it was writing when the
operating system did not (a failed ``write`` on an open file names none), and
:func:`describe_os_error` turns it into the message.
"""
from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["annotate", "describe_os_error"]

_AGAIN = ("then run the command again (gradops train --resume RUN_DIR continues a run from "
          "its last checkpoint)")
_HINTS = {
    errno.ENOSPC: "free some space, " + _AGAIN,
    errno.EDQUOT: "free some of the quota, " + _AGAIN,
    errno.EFBIG: "the file size limit (ulimit -f) was reached; raise it, " + _AGAIN,
    errno.EROFS: "the file system is read-only; choose a writable directory",
    errno.EACCES: "no permission; choose a directory you can write",
    errno.EPERM: "not permitted; choose a directory you can write",
}


@contextlib.contextmanager
def annotate(path: str | Path) -> Iterator[None]:
    """Re-raise an :class:`OSError` of the block that names no file as one naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise type(e)(e.errno, e.strerror or str(e), str(path)) from e
        raise


def describe_os_error(e: OSError) -> str:
    """``PATH: cause (ECODE); what to do`` on one line."""
    cause = e.strerror or (os.strerror(e.errno) if e.errno else str(e)) or type(e).__name__
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    text = f"{e.filename}: {cause}" if e.filename is not None else cause
    if e.filename2 is not None:
        text += f" (-> {e.filename2})"
    if code:
        text += f" ({code})"
    hint = _HINTS.get(e.errno) if e.errno else None
    if hint:
        text += f"; {hint}"
    return " ".join(text.split())
