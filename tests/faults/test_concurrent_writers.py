"""One owner per run directory: a second writer (train, train --resume, --overwrite, compare,
recon) is refused with the holder's PID, exit 2, and writes nothing; two runs started at once on
one directory never mix."""
import json
import os

from fault_helpers import TINY, one_line_error, popen, snapshot
from fault_helpers import data_cache  # noqa: F401 (the suite's autouse fixture)

from gradops.cli import main
from gradops.train.runs.rundir import LOCK_FILE, DirLock


def _files(d):
    return {k: v for k, v in snapshot(d).items() if k != LOCK_FILE}


def test_a_held_directory_refuses_every_writer(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + TINY) == 0
    capsys.readouterr()
    before = _files(run)
    pid = f"PID {os.getpid()}"
    with DirLock(run):          # held as another process would (flock: per open file)
        for argv, opt in ((["train", "--resume", str(run), "--no-progress"], "--resume"),
                          (["train", "--out", str(run), "--overwrite"] + TINY, "--out"),
                          (["train", "--out", str(run)] + TINY, "--out")):
            assert main(argv) == 2, argv
            one_line_error(capsys.readouterr().err, opt, str(run), "in use", pid)
    assert _files(run) == before

    cmp_dir, rec = tmp_path / "cmp", tmp_path / "rec"
    for d in (cmp_dir, rec):
        d.mkdir()
        (d / "mine.txt").write_text("kept\n")
    with DirLock(cmp_dir), DirLock(rec):
        assert main(["compare", "--out", str(cmp_dir), "--budget", "quick", "--methods", "ew",
                     "--resume", "--no-progress"]) == 2
        one_line_error(capsys.readouterr().err, "--out", str(cmp_dir), pid)
        assert main(["recon", "search", "--out", str(rec), "--overwrite", "--iters", "2",
                     "--no-progress"]) == 2
        one_line_error(capsys.readouterr().err, "--out", str(rec), pid)
        assert main(["recon", "compare", "--out", str(rec), "--overwrite", "--ranking",
                     str(tmp_path / "ranking.json"), "--topk", "1", "--iters", "2"]) == 2
        one_line_error(capsys.readouterr().err, "--out", str(rec), pid)
    for d in (cmp_dir, rec):
        assert sorted(p.name for p in d.iterdir()) == [LOCK_FILE, "mine.txt"]
    # the lock of a finished (or killed) process is free again: nothing stale to remove
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_two_runs_started_at_once_never_mix(tmp_path):
    d = tmp_path / "D"
    args = ["train", "--out", str(d), "--epochs", "2", "--train-limit", "384", "--width", "4",
            "--batch-size", "32", "--threads", "1", "--no-progress"]
    procs = [popen(args + ["--method", m]) for m in ("pcgrad", "famo")]
    outs = [p.communicate(timeout=400) for p in procs]
    rcs = sorted(p.returncode for p in procs)
    assert rcs == [0, 2], [o[1][-2000:] for o in outs]
    loser = outs[[p.returncode for p in procs].index(2)][1]
    line = one_line_error(loser, "--out", str(d))
    assert "in use" in line or "not empty" in line, line
    winner = ("pcgrad", "famo")[[p.returncode for p in procs].index(0)]
    lines = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    assert [(x["epoch"], x["split"]) for x in lines] == [
        (e, s) for e in (1, 2) for s in ("train", "val", "test")]
    assert json.loads((d / "result.json").read_text())["method"] == winner
    assert f'method = "{winner}"' in (d / "config.toml").read_text()
