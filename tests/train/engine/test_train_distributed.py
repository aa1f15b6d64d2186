"""``torchrun --nproc_per_node=2 -m gradops train`` (gloo, CPU) gives the result of one process
on the same global batch, up to float rounding (an MLP encoder: BatchNorm's batch statistics are
per process, so a CNN would differ by design)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from gradops.cli import main

ARGS = ["--backbone", "mlp", "--epochs", "2", "--train-limit", "256", "--width", "4",
        "--batch-size", "32", "--threads", "1", "--no-progress"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("method", ["pcgrad", "famo"])
def test_torchrun_two_processes_equal_one(tmp_path, method):
    ddp = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gradops", "train", "--method", method, "--out", str(ddp)] + ARGS
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("gradops train:") == 1          # rank 0 reports, once
    single = tmp_path / "single"
    assert main(["train", "--method", method, "--out", str(single)] + ARGS) == 0

    a = json.loads((ddp / "result.json").read_text())
    b = json.loads((single / "result.json").read_text())
    for task, ms in b["tasks"].items():
        for k, v in ms.items():
            assert a["tasks"][task][k] == pytest.approx(v, rel=1e-3, abs=1e-3), (task, k)
    assert a["gc_all"] == pytest.approx(b["gc_all"], abs=1e-6)
    wa = torch.load(ddp / "checkpoint.pt", weights_only=False)["trainer"]["model"]
    wb = torch.load(single / "checkpoint.pt", weights_only=False)["trainer"]["model"]
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    lines = [json.loads(ln) for ln in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [(ln["epoch"], ln["split"]) for ln in lines][:3] == [(1, "train"), (1, "val"),
                                                                (1, "test")]
