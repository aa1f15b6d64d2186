"""The prepared GPU check (``scripts/gpu-check.sh``) in its dry run: the same steps on the CPU at
tiny sizes, so that the script that runs on a lent GPU machine is known to work before the lease.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "build", "copy_bw", "pytest_gpu", "ops_fp32", "ops_bf16", "mtl_mlp", "mtl_cnn",
         "compare", "mtl_memory", "info")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    return proc, out


def test_dry_run_passes_every_step(dry_run):
    proc, out = dry_run
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DRY RUN" in summary
    for name in STEPS:
        assert f"| {name} | pass |" in summary, (name, summary)


def test_dry_run_writes_results_and_headlines(dry_run):
    _, out = dry_run
    summary = (out / "summary.md").read_text()
    for f in ("ops.csv", "mtl.csv", "mtl_memory.csv", "pytest-gpu.xml", "gpu-check.tar.gz"):
        assert (out / f).is_file(), f
    assert "Copy bandwidth (read + write) measured on cpu" in summary
    assert "| gram | 8 | float32 |" in summary and "| gram | 8 | bfloat16 |" in summary
    assert "| mlp | 3 | pcgrad | gradops MTLOptimizer |" in summary
    assert "| cnn | 3 | mgda | gradops MTLOptimizer |" in summary
    assert "report.md written" in summary
    # without a GPU every gpu-marked case is collected and skipped, none run
    assert "`pytest -m gpu`: 0 passed, 0 failed, 0 errors," in summary
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {f"{s}.log" for s in STEPS} <= names
    assert "report.md" in names


def test_bad_option_is_a_one_line_error(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--frobnicate"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu-check: unknown option --frobnicate (see --help)"
