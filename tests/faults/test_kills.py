"""Kills at random points (SIGKILL: mid-epoch, inside a checkpoint's write, fsync or rename, at
start-up), then the way back (``--resume``, or ``--overwrite`` when no checkpoint was written):
the same metrics and weights as an uninterrupted run, and no temporary file left. Temporaries
of killed writers are removed at start-up, foreign files never."""
import json
import random
import signal
import time

import torch
from fault_helpers import popen, temporaries
from fault_helpers import data_cache  # noqa: F401 (the suite's autouse fixture)

from gradops.cli import main

ARGS = ["--epochs", "3", "--train-limit", "256", "--width", "4", "--batch-size", "32",
        "--threads", "1", "--no-progress", "--checkpoint-every", "1", "--method", "pcgrad",
        "--schedule", "step", "--step-size", "1"]


def _strip(path):
    return [{k: v for k, v in json.loads(ln).items() if k != "time_s"}
            for ln in path.read_text().splitlines()]


def test_kills_at_random_points_then_resume(tmp_path, capsys):
    ref = tmp_path / "ref"
    assert main(["train", "--out", str(ref)] + ARGS) == 0
    seeds = (0, 1, 2)
    runs = {s: tmp_path / f"killed{s}" for s in seeds}
    procs = {s: popen(["train", "--out", str(runs[s])] + ARGS) for s in seeds}
    # each is killed a random 0-1.5 s after it took its directory's lock
    delay = {s: random.Random(s).uniform(0.0, 1.5) for s in seeds}
    due: dict[int, float] = {}
    deadline = time.monotonic() + 400
    while len(due) < len(seeds) or any(procs[s].poll() is None for s in seeds):
        now = time.monotonic()
        assert now < deadline
        for s in seeds:
            if s not in due and ((runs[s] / ".gradops.lock").exists()
                                 or procs[s].poll() is not None):
                due[s] = now + delay[s]
            if s in due and now >= due[s] and procs[s].poll() is None:
                procs[s].send_signal(signal.SIGKILL)
        time.sleep(0.002)
    for s in seeds:
        procs[s].communicate(timeout=60)
        d = runs[s]
        again = ["--resume", str(d), "--no-progress"] if (d / "checkpoint.pt").exists() else \
            ["--out", str(d), "--overwrite"] + ARGS
        assert main(["train"] + again) == 0, (s, capsys.readouterr().err)
        assert _strip(d / "metrics.jsonl") == _strip(ref / "metrics.jsonl"), s
        assert (d / "conflicts.csv").read_text() == (ref / "conflicts.csv").read_text(), s
        a = torch.load(d / "checkpoint.pt", weights_only=False)["trainer"]["model"]
        b = torch.load(ref / "checkpoint.pt", weights_only=False)["trainer"]["model"]
        assert all(torch.equal(a[n], b[n]) for n in b), s
        assert temporaries(d) == [], s


def test_start_up_removes_killed_writers_temporaries_only(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + ARGS[:-6] + ["--epochs", "1"]) == 0
    (run / "result.json").unlink()                      # as if killed after its checkpoint
    debris = [".checkpoint.pt.tmp424242", ".metrics.jsonl.tmp7", ".result.json.tmp99"]
    foreign = ["notes.txt", ".notes.tmp", "x.tmp12", ".hidden"]
    for n in debris + foreign:
        (run / n).write_bytes(b"partial")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    names = {p.name for p in run.iterdir()}
    assert not names & set(debris) and set(foreign) <= names
    # --overwrite removes the run's files (its manifest), never the foreign ones
    (run / debris[0]).write_bytes(b"partial")
    assert main(["train", "--out", str(run), "--overwrite"] + ARGS[:-6] + ["--epochs", "1"]) == 0
    names = {p.name for p in run.iterdir()}
    assert debris[0] not in names and set(foreign) <= names
