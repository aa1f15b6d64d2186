"""Helpers of the fault suite: the tiny run options, a CLI runner in a subprocess and the checks
every fault test makes (one line on stderr, exit 2, no temporary files left)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradops.train.runs.rundir import TEMP_PATTERN

pytest.importorskip("sklearn", reason="the trainer's data sets need scikit-learn")

ROOT = Path(__file__).resolve().parents[2]
#: A tiny run (about a second of training on a busy 2-core machine).
TINY = ["--epochs", "2", "--train-limit", "128", "--width", "4", "--batch-size", "32",
        "--threads", "1", "--no-progress", "--checkpoint-every", "1"]


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def popen(args: list[str], **kw) -> subprocess.Popen:
    """``python -m gradops ARGS`` in a subprocess (stdout and stderr piped)."""
    return subprocess.Popen([sys.executable, "-m", "gradops", *args], env=kw.pop("env", env()),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def temporaries(d: Path) -> list[str]:
    """The atomic writer's temporary files anywhere under ``d``."""
    return sorted(str(p) for p in Path(d).rglob("*") if TEMP_PATTERN.match(p.name))


def one_line_error(err: str, *needles: str) -> str:
    """The stderr of a refused command: exactly one non-empty line, no traceback, naming each
    of ``needles``; returns it."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1, err[-3000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` and its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """One data-set cache for the fault suite, filled once (the subprocesses inherit it through
    ``GRADOPS_DATA_CACHE``). Each test module imports it (no conftest.py here: a second
    ``conftest`` module would shadow tests/conftest.py for the modules collected after it)."""
    old = os.environ.get("GRADOPS_DATA_CACHE")
    d = tmp_path_factory.mktemp("fault_data")
    os.environ["GRADOPS_DATA_CACHE"] = str(d)
    from gradops.train.data import load_dataset
    load_dataset("digits", None, 0)
    yield d
    if old is None:
        os.environ.pop("GRADOPS_DATA_CACHE", None)
    else:
        os.environ["GRADOPS_DATA_CACHE"] = old
