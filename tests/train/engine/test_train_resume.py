"""Resume after a kill: a run killed (SIGKILL) in the middle of an epoch and resumed from its last
checkpoint ends with the same weights, metrics and statistics as an uninterrupted run (CPU)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gradops.cli import main

ARGS = ["--epochs", "3", "--train-limit",
        "1024", "--width", "4", "--batch-size", "32", "--threads", "1", "--no-progress",
        "--schedule", "step", "--step-size", "1"]


def _strip_times(path):
    out = []
    for ln in path.read_text().splitlines():
        d = json.loads(ln)
        d.pop("time_s")
        out.append(d)
    return out


@pytest.mark.parametrize("method, sparse", [("famo", "fraction=0.3"), ("nashmtl", "off")])
def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path, method, sparse):
    args = ["--method", method, "--sparse", sparse] + ARGS
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "gradops", "train", "--out", str(killed)]
                            + args, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ck = killed / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not ck.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)          # epoch 1 is checkpointed: now inside epoch 2
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (killed / "result.json").exists()
    epoch = torch.load(ck, weights_only=False)["epoch"]
    assert 1 <= epoch < 3

    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    whole = tmp_path / "whole"
    assert main(["train", "--out", str(whole)] + args) == 0

    a = json.loads((killed / "result.json").read_text())
    b = json.loads((whole / "result.json").read_text())
    for k in ("tasks", "gc_all", "gc_last50", "cosine_hist"):
        assert a[k] == b[k], k
    assert _strip_times(killed / "metrics.jsonl") == _strip_times(whole / "metrics.jsonl")
    assert (killed / "conflicts.csv").read_text() == (whole / "conflicts.csv").read_text()
    wa = torch.load(ck, weights_only=False)["trainer"]
    wb = torch.load(whole / "checkpoint.pt", weights_only=False)["trainer"]
    for k in wb["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    assert torch.equal(torch.as_tensor(wa["rng"]["torch"]), torch.as_tensor(wb["rng"]["torch"]))
    # resuming a finished run does nothing and keeps its result
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    assert json.loads((killed / "result.json").read_text()) == a
