"""Every script of examples/ runs (issue 28), on tiny sizes: each one needs an entry in ARGS
(its command-line arguments for a run of a few seconds)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS: dict[str, list[str]] = {
    "mtl_training.py": ["--T", "2", "--steps", "12"],
    "ops_quickstart.py": [],
}


def test_every_example_has_tiny_arguments():
    scripts = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    assert scripts, "examples/ holds no scripts"
    assert scripts == sorted(ARGS), ("give each script of examples/ its tiny arguments in "
                                     f"ARGS: scripts {scripts}, ARGS {sorted(ARGS)}")


@pytest.mark.parametrize("name", sorted(ARGS))
def test_example_runs(name, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), *ARGS[name]],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"examples/{name} exited {r.returncode}:\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), f"examples/{name} printed nothing"
