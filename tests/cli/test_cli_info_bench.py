"""`gradops info` and `gradops bench` end to end (gradops/cli/info.py, gradops/cli/bench.py): the
report, the gram, methods and mtl suites on small sizes, their CSVs (--append, the breakdown), a
refused option. Timings are not checked: these are not timed tests."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import gradops


def test_cli_info_and_bench(tmp_path):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "gradops", "info"], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "segment_gram" in out
    csv_path = tmp_path / "bench.csv"
    out = subprocess.run([sys.executable, "-m", "gradops", "bench", "--suite", "gram", "--T", "2,3",
                          "--P", "5000", "--segments", "7", "--rounds", "3",
                          "--csv", str(csv_path)],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert "| gram | gradops | 2 |" in out and "| segment_gram | gradops | 3 |" in out
    lines = csv_path.read_text().strip().splitlines()
    assert lines[0].startswith("date,device_name,torch,triton,gradops,git_rev,omp_wait_policy,"
                               "op,impl,T,P,L,dtype,device,ms")
    assert len(lines) == 1 + 2 * 8
    row = dict(zip(lines[0].split(","), lines[1].split(",")))
    assert row["torch"] == torch.__version__ and row["gradops"] == gradops.__version__
    assert row["date"].count("-") == 2 and row["device_name"].startswith("cpu")
    # --append adds one more run's rows under the same header; a file of other columns is refused
    subprocess.run([sys.executable, "-m", "gradops", "bench", "--suite", "gram", "--T", "2",
                    "--P", "999", "--segments", "3", "--rounds", "3", "--csv", str(csv_path),
                    "--append"], capture_output=True, text=True, env=env, check=True)
    assert len(csv_path.read_text().strip().splitlines()) == 1 + 3 * 8
    from gradops.bench.report import write_csv
    with pytest.raises(ValueError, match="has columns"):
        write_csv([{"other": 1}], str(csv_path), append=True)
    out = subprocess.run([sys.executable, "-m", "gradops", "bench", "--suite", "methods",
                          "--T", "3",
                          "--P", "5000", "--rounds", "3"],
                         capture_output=True, text=True, env=env, check=True).stdout
    for op in ("combine", "pcgrad", "graddrop"):
        assert f"| {op} | gradops | 3 |" in out


def test_cli_bench_mtl_smoke(tmp_path):
    """`gradops bench --suite mtl` runs end to end on a small model and writes its CSV."""
    csv_path = tmp_path / "mtl.csv"
    out = subprocess.run([sys.executable, "-m", "gradops", "bench", "--suite", "mtl", "--quick",
                          "--T", "2", "--methods", "ew,pcgrad", "--rounds", "2", "--budget", "1",
                          "--csv", str(csv_path)],
                         capture_output=True, text=True, env=dict(os.environ), check=True).stdout
    assert "| 2 | pcgrad |" in out and "PCGrad" in out
    assert "| 2 | per-task gradients by one batched (vmap) backward |" in out
    lines = csv_path.read_text().strip().splitlines()
    assert len(lines) >= 1 + 2 and "pcgrad" in csv_path.read_text()


def test_cli_bench_mtl_breakdown(tmp_path):
    """`--breakdown --breakdown-at` splits the step at each T asked for (as shipped and, where the
    Linear engine took layers, on the J path), prints the Gram + combine table and writes the
    stages' CSV; a T outside --T is refused."""
    csv_path = tmp_path / "mtl.csv"
    base = [sys.executable, "-m", "gradops", "bench", "--suite", "mtl", "--quick", "--T", "2,3",
            "--methods", "pcgrad", "--rounds", "2", "--budget", "1", "--breakdown"]
    out = subprocess.run([*base, "--breakdown-at", "2,3", "--csv", str(csv_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "gradops step breakdown, T = 2, 3" in out
    assert "| method | T | Gram, x floor step | combine | Gram + combine | whole step |" in out
    for T in (2, 3):
        line = next(x for x in out.splitlines() if x.startswith(f"| pcgrad | {T} | "))
        cells = [float(c.strip().rstrip("x")) for c in line.strip("|").split("|")[2:]]
        assert all(c > 0 for c in cells) and abs(cells[2] - cells[0] - cells[1]) < 2e-3
    import csv
    stages = list(csv.DictReader((tmp_path / "mtl_breakdown.csv").open()))
    assert {r["T"] for r in stages} == {"2", "3"}
    assert {r["method"] for r in stages} >= {"floor", "pcgrad"}
    bad = subprocess.run([*base, "--breakdown-at", "5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--breakdown-at 5 must be among --T 2,3" in bad.stderr
