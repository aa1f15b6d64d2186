"""One line, exit 2, nothing written, where tracebacks or silent defaults were: --weights of
the wrong shapes, a ranking naming an unknown layer, bad bench options,
empty values, --overwrite and the previous run's add-on files, the messages of --resume."""
import json

import pytest
import torch
from fault_helpers import TINY, one_line_error
from fault_helpers import data_cache  # noqa: F401 (the suite's autouse fixture)

from gradops.cli import main


def _refused(capsys, argv, *needles):
    assert main(argv) == 2, argv
    return one_line_error(capsys.readouterr().err, *needles)


def test_weights_of_the_wrong_shapes(tmp_path, capsys):
    from gradops.train.data import load_dataset
    from gradops.train.models.encoders import build_encoder
    enc, _ = build_encoder("cnn", load_dataset("digits").input_shape, 8)
    torch.save(enc.state_dict(), tmp_path / "w8.pt")            # same keys, width 8
    out = tmp_path / "run"
    _refused(capsys, ["train", "--out", str(out), "--weights", str(tmp_path / "w8.pt")] + TINY,
             "--weights", "wrong shapes", "w8.pt")
    assert not out.exists()


def test_recon_compare_with_an_unknown_layer(tmp_path, capsys):
    ranking = tmp_path / "ranking.json"
    ranking.write_text(json.dumps([{"layer": "no.such.layer", "score": 3, "params": 10}]))
    out = tmp_path / "tab"
    _refused(capsys, ["recon", "compare", "--ranking", str(ranking), "--topk", "1", "--iters",
                      "2", "--out", str(out), "--train-limit", "64"], "--ranking",
             "no.such.layer")
    assert not out.exists()


@pytest.mark.parametrize("opt, value, needle", [
    ("--T", "0", ">= 1"), ("--T", "-3", ">= 1"), ("--T", "abc", "not an integer"),
    ("--T", "", "list"), ("--segments", "0", ">= 1"), ("--backend", "foo", "triton"),
    ("--P", "0", ">= 1"), ("--breakdown-at", "x", "not an integer")])
def test_bench_options(capsys, opt, value, needle):
    _refused(capsys, ["bench", "--quick", opt, value], opt, needle)


def test_empty_values_are_refused(tmp_path, capsys):
    cmp = tmp_path / "cmp"
    for opt in ("--methods", "--sparse", "--seeds"):
        _refused(capsys, ["compare", "--out", str(cmp), "--budget", "quick", opt, ""], opt)
    assert not cmp.exists()
    _refused(capsys, ["train", "--out", ""] + TINY, "--out", "empty")
    _refused(capsys, ["train", "--resume", ""], "--resume", "empty")
    _refused(capsys, ["compare", "--out", "", "--budget", "quick"], "--out", "empty")
    _refused(capsys, ["recon", "search", "--out", ""], "--out", "empty")
    _refused(capsys, ["train", "--out", str(tmp_path / "r"), "--config", ""] + TINY,
             "--config", "empty")
    assert not (tmp_path / "r").exists()


def test_overwrite_removes_exactly_the_runs_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--probe", "every=2,samples=8"] + TINY) == 0
    assert (run / "probes.csv").is_file() and (run / "probes.png").is_file()
    (run / "my-notes.txt").write_text("mine\n")
    assert main(["train", "--out", str(run), "--overwrite"] + TINY) == 0
    names = sorted(p.name for p in run.iterdir())
    assert names == [".gradops-manifest.json", ".gradops.lock", "checkpoint.pt", "config.toml",
                     "conflicts.csv", "metrics.jsonl", "my-notes.txt", "result.json"]
    assert json.loads((run / ".gradops-manifest.json").read_text()) == [
        "checkpoint.pt", "config.toml", "conflicts.csv", "metrics.jsonl", "result.json"]
    capsys.readouterr()


def test_resume_messages(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + TINY) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "is already finished (2 of 2 epochs)" in capsys.readouterr().out
    (run / "checkpoint.pt").unlink()
    _refused(capsys, ["train", "--resume", str(run), "--no-progress"], "--resume",
             "no checkpoint", "--overwrite")
