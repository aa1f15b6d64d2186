"""Failed runs are named, never averaged: a diverged ``gradops train`` stops
with one line naming the epoch and the task, exits with EXIT_DIVERGED and writes strict JSON;
``gradops compare`` keeps going, leaves it out of every mean and counts it in each row."""
from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from train_helpers import SMALL
from fake_runs import GRID, STL, write_fake_run

from gradops.cli import main
from gradops.train.engine.divergence import (CHANCE_FROM_EPOCH, CHANCE_MARGIN, CHANCE_PATIENCE,
                                      EXIT_DIVERGED,
                                      REGRESSION_MARGIN, ChanceLevel, chance_levels, check_epoch,
                                      strict_json)
from gradops.train.report.build import format_table_1, format_table_2, write_report
from gradops.train.report.data import load_runs
from gradops.train.tasks.types import Binary, Classification, Regression


def _strict(text: str):
    """json.loads that refuses NaN / Infinity (Python's json accepts them by default)."""
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_forced_divergence_is_detected_and_written_as_strict_json(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--lr", "1e6", "--epochs", "2", "--out", str(out)] + SMALL)
    assert rc == EXIT_DIVERGED == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    # at this rate epoch 1's mean training losses are already non-finite (which task's is
    # first depends on the platform's arithmetic: any of the three)
    m = re.fullmatch(r"gradops train: diverged at epoch 1, task (left|right|sum): training loss "
                     r"is (nan|inf|-inf) -> (.+)", err[0])
    assert m is not None, err[0]
    assert m[3] == str(out)
    res = _strict((out / "result.json").read_text())
    assert res["status"] == "diverged" and res["lr"] == 1e6
    assert res["divergence"] == {"epoch": 1, "task": m[1], "reason": f"training loss is {m[2]}"}
    lines = [_strict(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(ln["epoch"], ln["split"]) for ln in lines] == [(1, "train"), (1, "val"), (1, "test")]
    assert lines[0]["losses"][m[1]] is None              # the non-finite loss written as null
    assert res["tasks"] == lines[2]["metrics"]
    assert not (out / "checkpoint.pt").exists()          # a diverged state is not checkpointed


def test_healthy_run_says_ok(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out)] + SMALL) == 0
    res = _strict((out / "result.json").read_text())
    assert res["status"] == "ok" and "divergence" not in res and res["lr"] == 2e-3


# --- the rule on hand-made epoch lines ---------------------------------------------------------
def _line(left=0.5, right=0.5, mae=1.0, loss=1.0):
    return {"losses": {"left": loss, "right": 1.0, "sum": 1.0},
            "metrics": {"left": {"accuracy": left}, "right": {"accuracy": right},
                        "sum": {"mae": mae}}}


CHANCE = {"left": ChanceLevel("accuracy", 0.1, "up"), "right": ChanceLevel("accuracy", 0.12, "up"),
          "sum": ChanceLevel("mae", 3.0, "down")}


def test_check_epoch_rules():
    ok = _line()
    assert check_epoch(5, ok, ok, CHANCE) == (None, 0)
    d, _ = check_epoch(2, _line(loss=math.nan), ok, CHANCE)
    assert (d.epoch, d.task, d.reason) == (2, "left", "training loss is nan")
    d, _ = check_epoch(1, ok, {**ok, "losses": {"left": 1.0, "right": math.inf}}, CHANCE)
    assert (d.task, d.reason) == ("right", "validation loss is inf")
    # an undefined metric (NaN) with finite losses is not a divergence, nor at chance
    assert check_epoch(5, ok, _line(left=math.nan, right=0.0, mae=9.0), CHANCE, 2) == (None, 0)
    assert check_epoch(1, ok, None, CHANCE) == (None, 0)


def test_chance_needs_every_task_for_consecutive_epochs():
    ok = _line()
    dead = _line(left=0.1 + CHANCE_MARGIN, right=0.08, mae=3.0 * (1 - REGRESSION_MARGIN))
    # epoch 1 never counts; then CHANCE_PATIENCE consecutive epochs at chance stop the run
    assert check_epoch(CHANCE_FROM_EPOCH - 1, ok, dead, CHANCE) == (None, 0)
    streak, e = 0, CHANCE_FROM_EPOCH
    for _ in range(CHANCE_PATIENCE - 1):
        d, streak = check_epoch(e, ok, dead, CHANCE, streak)
        assert d is None
        e += 1
    d, streak = check_epoch(e, ok, dead, CHANCE, streak)
    assert streak == CHANCE_PATIENCE and d.epoch == e == 4
    assert d.task == "all (left, right, sum)"
    assert d.reason.startswith(f"validation metrics at chance level on every task for "
                               f"{CHANCE_PATIENCE} epochs (left accuracy 0.12 <= 0.12; ")
    assert d.message() == f"gradops train: diverged at epoch 4, task all (left, right, sum): " \
        f"{d.reason}"
    # an epoch above chance resets the streak; one task above chance is enough
    assert check_epoch(5, ok, ok, CHANCE, 2) == (None, 0)
    assert check_epoch(5, ok, {**dead, "metrics": {**dead["metrics"], "sum": {"mae": 2.0}}},
                       CHANCE, 2) == (None, 0)
    assert check_epoch(5, ok, _line(left=0.1 + CHANCE_MARGIN + 1e-3, right=0.0, mae=9.0),
                       CHANCE, 2) == (None, 0)


def test_chance_levels_per_task_type():
    tasks = [Classification("c", 4), Binary("b"), Regression("r")]
    targets = {"c": torch.tensor([0, 0, 0, 1, 2, 3, 1, 0]),          # majority 4/8
               "b": torch.tensor([1., 0., 0., 0.]),                   # majority 3/4
               "r": torch.tensor([1., 2., 3., 10.])}   # median 2: (1 + 0 + 1 + 8) / 4
    lv = chance_levels(tasks, targets)
    assert lv["c"] == ChanceLevel("accuracy", 0.5, "up")
    assert lv["b"] == ChanceLevel("accuracy", 0.75, "up")
    assert lv["r"].metric == "mae" and lv["r"].level == pytest.approx(2.5)


def test_strict_json():
    assert strict_json({"a": [1.0, math.nan], "b": {"c": -math.inf, "d": "x"}, "e": 2}) == \
        {"a": [1.0, None], "b": {"c": None, "d": "x"}, "e": 2}


# --- the report leaves diverged runs out ------------------------------------------------------
def _diverge(run, epoch=3, task="left"):
    res = json.loads((run / "result.json").read_text())
    res.update(status="diverged", divergence={"epoch": epoch, "task": task,
                                              "reason": "training loss is nan"})
    res["tasks"]["left"]["accuracy"] = None
    (run / "result.json").write_text(json.dumps(res))


def test_report_excludes_diverged_runs_and_counts_them(tmp_path):
    for (method, sparse), seeds in GRID.items():
        if method == "ew":
            for seed, v in seeds.items():
                write_fake_run(tmp_path, method, sparse, seed, v[:4], v[4:])
    for seed, v in STL.items():
        write_fake_run(tmp_path, "stl", "off", seed, v)
    # a third ew seed with absurd values: diverged, so it must change no mean
    _diverge(write_fake_run(tmp_path, "ew", "off", 2, (0.01, 0.01, 0.01, 99.0), (0.0, 0.0)))
    runs, failed = load_runs(tmp_path)
    assert [f.status for f in failed] == ["diverged"] and failed[0].epoch == 3
    t1 = format_table_1(runs, failed=failed)
    assert "| Method | All epochs ↓ | Last 50% epochs ↓ | seeds (failed) |" in t1
    assert "| Joint Train (ew) | 32.00 ± 2.83 | 37.00 ± 1.41 | 2 (1) |" in t1
    assert "| w/ ST (fraction=0.3) | 26.00 ± 1.41 (6.00) | 29.00 ± 1.41 (8.00) | 2 (0) |" in t1
    t2 = format_table_2(runs, failed=failed)
    assert "| Joint Train (ew) | 0.8645 ± 0.0643 | 0.7995 ± 0.0290 | 0.8610 ± 0.0580 " \
           "| 2.3100 ± 0.2970 | 2.92 ± 2.95 | 2 (1) |" in t2
    text = write_report(tmp_path, plots=False).read_text()
    assert "## Failed runs: diverged" in text and "| `ew__off__s2` | ew | off |" in text
    assert "6 complete run(s), 0 missing, 1 diverged" in text
    with (tmp_path / "summary.csv").open() as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert rows["ew__off__s2"]["status"] == "diverged" and rows["ew__off__s2"]["delta_m"] == ""


def test_compare_keeps_going_past_a_diverged_run(tmp_path, capsys):
    # FAMO's weight step at 1e30 makes its losses non-finite in epoch 1; ew and stl are fine
    out = tmp_path / "cmp"
    rc = main(["compare", "--methods", "ew,famo", "--sparse", "off", "--seeds", "0", "--epochs",
               "1", "--method-opt", "famo.lr=1e30", "--jobs", "1", "--out", str(out)] + SMALL)
    assert rc == 0
    printed = capsys.readouterr()
    assert "gradops train: diverged at epoch 1, task left" in printed.err
    assert "1 run(s) diverged and are left out of every mean" in printed.out
    text = (out / "report.md").read_text()
    assert "| `famo__off__s0` | famo | off | 0.002 | 0 | 1 | left |" in text
    assert "| FAMO | — | — | 0 (1) |" in text                         # Table 1
    assert "| Joint Train (ew) |" in text and "| seeds (failed) |" in text
    famo_t2 = [ln for ln in text.splitlines() if ln.startswith("| FAMO |") and "Δm" not in ln]
    assert len(famo_t2) == 2 and famo_t2[1].endswith("| — | 0 (1) |")  # Table 2: no mean
