"""The report's protocol: the learning rate chosen on validation (never
test), the "Does it reproduce?" verdicts on hand-made paired seeds, and the last-10 column only
for runs long enough for it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from train_helpers import SMALL

from gradops.cli import main
from gradops.train.report.build import write_report
from gradops.train.report.data import load_runs, parse_run_dir_name
from gradops.train.report.epochs import LAST10_MIN_EPOCHS, format_epoch_table
from gradops.train.report.lr import select_lr
from gradops.train.report.verdicts import (GRADIENT_MANIPULATION, T_MIN, format_reproduction,
                                           paired_claims, verdict)

DIRECTIONS = {"a": {"accuracy": "up"}, "b": {"mae": "down"}}


def _tasks(acc: float, mae: float) -> dict:
    return {"a": {"accuracy": acc}, "b": {"mae": mae}}


def write_run(root: Path, method: str, sparse: str, seed: int, lr: float | None, *,
              val: tuple[float, float], test: tuple[float, float], epochs: int = 2,
              gc: tuple[float, float] | None = (0.3, 0.3), name: str | None = None) -> Path:
    """A run directory whose final-epoch val and test metrics are ``val`` and ``test``."""
    rate = "" if lr is None else f"__lr{lr!r}"
    run = root / "runs" / (name or f"{method}__{sparse.replace('=', '-')}{rate}__s{seed}")
    run.mkdir(parents=True)
    lines = []
    for epoch in range(1, epochs + 1):
        for split, (acc, mae) in (("train", test), ("val", val), ("test", test)):
            lines.append({"epoch": epoch, "split": split, "losses": {"a": 1.0, "b": 1.0},
                          "metrics": _tasks(acc, mae), "gc": None, "time_s": 1.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = {"status": "ok", "method": method, "sparse": sparse, "seed": seed, "data": "toy",
           "epochs": epochs, "tasks": _tasks(*test), "directions": DIRECTIONS,
           "gc_all": None if gc is None else gc[0], "gc_last50": None if gc is None else gc[1],
           "cosine_hist": None, "time_s": 1.0}
    if lr is not None:
        res["lr"] = lr
    (run / "result.json").write_text(json.dumps(res))
    return run


# --- item 3: the learning rate is chosen on validation -----------------------------------------
def _lr_grid(root: Path) -> None:
    # STL: 0.001 is better on val (and on test); the baseline is its runs at 0.001
    for seed in (0, 1):
        write_run(root, "stl", "off", seed, 0.001, val=(0.8, 1.0), test=(0.8, 1.0))
        write_run(root, "stl", "off", seed, 0.01, val=(0.6, 1.5), test=(0.6, 1.5))
        # ew: 0.001 is the better rate on val, 0.01 the better on test: 0.001 must be picked
        write_run(root, "ew", "off", seed, 0.001, val=(0.88, 1.0), test=(0.72, 1.0))
        write_run(root, "ew", "off", seed, 0.01, val=(0.72, 1.0), test=(0.88, 1.0))
    # pcgrad: 0.01 has the best val score but one of its runs diverged; 0.001 is picked
    write_run(root, "pcgrad", "off", 0, 0.001, val=(0.8, 1.0), test=(0.8, 1.0))
    write_run(root, "pcgrad", "off", 0, 0.01, val=(0.9, 1.0), test=(0.9, 1.0))
    bad = write_run(root, "pcgrad", "off", 1, 0.01, val=(0.9, 1.0), test=(0.9, 1.0))
    res = json.loads((bad / "result.json").read_text())
    res.update(status="diverged", divergence={"epoch": 2, "task": "a", "reason": "x"})
    (bad / "result.json").write_text(json.dumps(res))


def test_lr_is_selected_on_validation_never_test(tmp_path):
    _lr_grid(tmp_path)
    runs, failed = load_runs(tmp_path)
    sel = select_lr(runs, failed)
    assert sel.chosen == {("stl", "off"): 0.001, ("ew", "off"): 0.001, ("pcgrad", "off"): 0.001}
    assert {(r.method, r.lr) for r in sel.runs} == {("stl", 0.001), ("ew", 0.001),
                                                    ("pcgrad", 0.001)}
    assert sel.failed == []                       # the failure was at the rate not picked
    ew = {c.lr: c.val_dm for c in sel.candidates[("ew", "off")]}
    # val Δm% against STL at 0.001 (acc 0.8, mae 1.0): acc 0.88 -> -10 / 2 = -5; 0.72 -> +5
    assert ew[0.001] == pytest.approx(-5.0) and ew[0.01] == pytest.approx(5.0)
    text = write_report(tmp_path, plots=False).read_text()
    assert "## Learning rate, chosen on validation" in text
    assert "| Joint Train (ew) | off | 0.001 | -5.00 | 2 (0) | **picked** | 5.00 ± 0.00 |" in text
    assert "| Joint Train (ew) | off | 0.01 | 5.00 | 2 (0) |  |  |" in text
    assert "| PCGrad | off | 0.01 | -6.25 | 1 (1) |  |  |" in text
    # Table 2 reports the test metrics at the picked rate (acc 0.72: Δm +5), not at 0.01
    row = next(ln for ln in text.splitlines() if ln.startswith("| Joint Train (ew) | 0.7200"))
    assert row.endswith("| 5.00 ± 0.00 | 2 |")
    assert "| Joint Train (ew) | 0.8800" not in text
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert summary[0].endswith(",status,run,lr") and len(summary) == 1 + 11


def test_single_rate_selects_nothing(tmp_path):
    write_run(tmp_path, "stl", "off", 0, 0.002, val=(0.8, 1.0), test=(0.8, 1.0))
    write_run(tmp_path, "ew", "off", 0, None, val=(0.8, 1.0), test=(0.8, 1.0), name="ew__off__s0")
    runs, failed = load_runs(tmp_path)
    sel = select_lr(runs, failed)
    assert not sel.active and sel.runs == runs
    assert "Learning rate, chosen" not in write_report(tmp_path, plots=False).read_text()


def test_run_dir_names_with_a_rate():
    assert parse_run_dir_name("pcgrad__fraction-0.6__lr0.008__s2") == ("pcgrad", "fraction=0.6", 2)
    assert parse_run_dir_name("ew__off__lr1e-05__s0") == ("ew", "off", 0)


def test_compare_lr_axis_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "ew", "--sparse", "off", "--seeds", "0", "--epochs",
                 "1", "--lr", "2e-3,1e6", "--jobs", "1", "--out", str(out)] + SMALL) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "ew__off__lr0.002__s0", "ew__off__lr1000000.0__s0", "stl__off__lr0.002__s0",
        "stl__off__lr1000000.0__s0"]
    text = (out / "report.md").read_text()
    assert "| Joint Train (ew) | off | 0.002 |" in text and "**picked**" in text
    assert "| Joint Train (ew) | off | 1e+06 | — | 0 (1) |  |  |" in text
    assert "2 complete run(s), 0 missing, 2 diverged" in text


def test_compare_lr_option_is_checked(tmp_path, capsys):
    for bad in ("0", "x", "-1e-3", ""):
        assert main(["compare", f"--lr={bad}", "--out", str(tmp_path / "c")] + SMALL) == 2
        assert "--lr" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# --- item 6: the verdict rule --------------------------------------------------------------------
@pytest.mark.parametrize("diffs, sign, expected", [
    ([-3.0, -2.0, -4.0], "<0", "holds"),                 # all agree, t = -5.2
    ([-3.0, -3.0], "<0", "holds"),                       # no spread: |t| infinite
    ([-10.0, -0.1, -0.2], "<0", "inconclusive"),         # all agree, t = -1.05 > -T_MIN
    ([-3.0, 1.0, -4.0], "<0", "inconclusive"),           # mixed signs
    ([-3.0, 0.0, -4.0], "<0", "inconclusive"),           # a zero does not agree
    ([2.0, 3.0, 4.0], "<0", "does not hold"),            # the reverse, t = 5.2
    ([-3.0], "<0", "inconclusive"),                      # one seed
    ([-3.0, math.nan], "<0", "inconclusive"),
    ([0.0, 2.0, 0.5], ">=0", "holds"),                   # never lowered
    ([-1.0, 2.0, 3.0], ">=0", "inconclusive"),
    ([-2.0, -3.0, -2.5], ">=0", "does not hold"),        # clearly lowered
    ([-10.0, -0.1, -0.2], ">=0", "inconclusive"),
])
def test_verdict_rule(diffs, sign, expected):
    assert T_MIN == 2.0
    assert verdict(diffs, sign) == expected


def _claims_grid(root: Path) -> None:
    """ew and pcgrad, off and ST, seeds 0-2, with known paired differences."""
    gc = {("ew", "off"): [(0.30, 0.32), (0.28, 0.30), (0.31, 0.33)],
          ("ew", "fraction=0.6"): [(0.25, 0.24), (0.24, 0.22), (0.26, 0.25)],
          ("pcgrad", "off"): [(0.32, 0.33), (0.27, 0.28), (0.33, 0.35)],
          ("pcgrad", "fraction=0.6"): [(0.33, 0.34), (0.26, 0.28), (0.35, 0.36)]}
    acc = {("ew", "off"): [0.80, 0.82, 0.81], ("ew", "fraction=0.6"): [0.84, 0.85, 0.86],
           ("pcgrad", "off"): [0.80, 0.80, 0.80], ("pcgrad", "fraction=0.6"): [0.81, 0.79, 0.80]}
    for seed in range(3):
        write_run(root, "stl", "off", seed, None, val=(0.8, 1.0), test=(0.8, 1.0), gc=None,
                  name=f"stl__off__s{seed}")
        for key, vals in gc.items():
            write_run(root, *key, seed, None, val=(0.8, 1.0), test=(acc[key][seed], 1.0),
                      gc=vals[seed], name=f"{key[0]}__{key[1].replace('=', '-')}__s{seed}")


def test_paired_claims_on_hand_made_runs(tmp_path):
    _claims_grid(tmp_path)
    runs, _ = load_runs(tmp_path)
    dm = {r.name: -50 * (r.tasks["a"]["accuracy"] - 0.8) / 0.8 for r in runs}   # Δm%: acc only
    items = {(p.claim, p.method): p for p in paired_claims(runs, lambda r: dm[r.name])}
    a_ew = items[("a", "ew")]
    assert a_ew.setting == "fraction=0.6"
    assert [round(d, 6) for d in a_ew.diffs.values()] == [-5.0, -4.0, -5.0]
    assert a_ew.agree == 3 and a_ew.verdict == "holds"
    a_pc = items[("a", "pcgrad")]                    # +1, -1, +2: mixed
    assert [round(d, 6) for d in a_pc.diffs.values()] == [1.0, -1.0, 2.0]
    assert a_pc.agree == 1 and a_pc.verdict == "inconclusive"
    # (b): (late change) - (all change): ew (-8 + 5, -8 + 4, -8 + 5) = (-3, -4, -3)
    b_ew = items[("b", "ew")]
    assert [round(d, 6) for d in b_ew.diffs.values()] == [-3.0, -4.0, -3.0]
    assert b_ew.verdict == "holds"
    # (c): Δm% with ST minus without: ew (-2.5, -1.875, -3.125) -> holds
    c_ew = items[("c", "ew")]
    assert [round(d, 6) for d in c_ew.diffs.values()] == [-2.5, -1.875, -3.125]
    assert c_ew.verdict == "holds" and items[("c", "pcgrad")].verdict == "inconclusive"
    # (d): pcgrad off minus ew off: +2, -1, +2 -> inconclusive; only gradient manipulation
    d_pc = items[("d", "pcgrad")]
    assert [round(d, 6) for d in d_pc.diffs.values()] == [2.0, -1.0, 2.0]
    assert d_pc.verdict == "inconclusive" and d_pc.agree == 2
    assert ("d", "ew") not in items and "pcgrad" in GRADIENT_MANIPULATION
    mean, std = a_ew.mean_std()
    assert mean == pytest.approx(-14 / 3) and std == pytest.approx(math.sqrt(1 / 3))
    text = format_reproduction(runs, lambda r: dm[r.name])
    assert "| Joint Train (ew) | fraction=0.6 | s0: -5.00, s1: -4.00, s2: -5.00 | -4.67 ± 0.58 " \
           "| 3/3 | holds |" in text
    assert "Verdicts: 1 hold, 0 do not hold, 1 inconclusive (of 2)." in text
    assert "|t| ≥ 2" in text


def test_reproduction_section_in_report(tmp_path):
    _claims_grid(tmp_path)
    text = write_report(tmp_path, plots=False).read_text()
    assert "## Does it reproduce?" in text
    for claim in ("(a) ST lowers the incidence", "(b) ST lowers the incidence more",
                  "(c) ST improves Δm%", "(d) gradient-manipulation methods"):
        assert f"### {claim}" in text, claim


# --- item 8: the last-10 column needs long runs ------------------------------------------------
def test_last10_column_only_for_long_runs(tmp_path):
    short, long_ = tmp_path / "short", tmp_path / "long"
    for root, epochs in ((short, 8), (long_, LAST10_MIN_EPOCHS)):
        write_run(root, "stl", "off", 0, None, val=(0.8, 1.0), test=(0.8, 1.0), gc=None,
                  epochs=epochs, name="stl__off__s0")
        write_run(root, "ew", "off", 0, None, val=(0.8, 1.0), test=(0.7, 1.0), epochs=epochs,
                  name="ew__off__s0")
    from gradops.train.report.build import _groups, stl_baseline
    for root, present in ((short, False), (long_, True)):
        runs, _ = load_runs(root)
        table = format_epoch_table(_groups(runs), stl_baseline(runs))
        assert ("last-10 mean" in table.splitlines()[2]) is present
        if not present:
            assert "is not shown: it needs runs of at least 20 epochs" in table
            assert "these runs have 8 epoch(s)" in table
        else:
            # ew: test acc 0.7 every epoch against 0.8 -> Δm (12.5 + 0) / 2 = 6.25 in each column
            assert "| ew | off | 6.25 | 6.25 | 6.25 | 1 | 1 |" in table
