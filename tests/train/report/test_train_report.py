"""The compare report on fake run directories written by the run-directory contract.

Grid: ew, pcgrad, cagrad x sparse off / fraction=0.3 x seeds 0, 1, plus stl (off, seeds 0, 1),
one run without result.json (crashed) and one with a truncated result.json. Tasks: left
(accuracy, f1; up), right (accuracy; up), sum (mae; down).
"""
from __future__ import annotations

import csv
import json
import math
import struct
import zlib
from pathlib import Path

import pytest
from fake_runs import GRID, LAYERS, STL, write_fake_run

from gradops.train.report.build import format_table_1, format_table_2, write_report
from gradops.train.report.data import load_runs, parse_run_dir_name


def write_grid(root: Path, *, stl: bool = True, missing: bool = True) -> None:
    for (method, sparse), seeds in GRID.items():
        for seed, v in seeds.items():
            write_fake_run(root, method, sparse, seed, v[:4], v[4:])
    if stl:
        for seed, v in STL.items():
            write_fake_run(root, "stl", "off", seed, v)
    if missing:
        write_fake_run(root, "mgda", "off", 0, (0.5, 0.5, 0.5, 3.0), (0.4, 0.4), result=False)
        bad = write_fake_run(root, "graddrop", "k=300", 1, (0.5, 0.5, 0.5, 3.0), (0.4, 0.4))
        (bad / "result.json").write_text('{"method": "graddrop", "spa')


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    write_grid(root)
    path = write_report(root)
    assert path == root / "report.md"
    return root


def _summary(root: Path) -> list[dict]:
    with (root / "summary.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_summary_columns_and_rows(report_dir):
    rows = _summary(report_dir)
    with (report_dir / "summary.csv").open() as f:
        header = f.readline().strip().split(",")
    assert header[:7] == ["method", "sparse", "seed", "gc_all", "gc_last50", "delta_m", "time_s"]
    assert header[7:11] == ["left.accuracy", "left.f1", "right.accuracy", "sum.mae"]
    assert len(rows) == 12 + 2 + 2
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["method"], r["sparse"], r["seed"]) for r in ok[:4]] == [
        ("stl", "off", "0"), ("stl", "off", "1"), ("ew", "off", "0"), ("ew", "off", "1")]
    by_key = {(r["method"], r["sparse"], r["seed"]): r for r in rows}
    ew0, ew1 = by_key[("ew", "off", "0")], by_key[("ew", "off", "1")]
    assert float(ew0["delta_m"]) == pytest.approx(5.0, abs=1e-9)
    assert float(ew1["delta_m"]) == pytest.approx(2.5 / 3, abs=1e-9)
    assert float(ew0["gc_all"]) == 0.30 and float(ew0["gc_last50"]) == 0.36
    assert float(ew0["left.accuracy"]) == 0.819 and float(ew0["sum.mae"]) == 2.52
    assert float(ew1["time_s"]) == 11.0
    # STL's own Δm per seed: s0 left acc 0.90 vs 0.91 -> +1.0989.., f1 0.80 vs 0.82 -> +2.439..
    # -> left 1.7691..; right 0.80 vs 0.82 -> +2.439..; mae 2.0 vs 2.1 -> -4.7619..
    stl0 = by_key[("stl", "off", "0")]
    expected = ((100 / 91 + 100 / 41) / 2 + 100 / 41 - 100 / 21) / 3
    assert float(stl0["delta_m"]) == pytest.approx(expected, abs=1e-9)
    assert stl0["gc_all"] == "" and stl0["gc_last50"] == ""
    miss = by_key[("mgda", "off", "0")]
    assert miss["status"] == "missing" and miss["delta_m"] == "" and miss["run"] == "mgda__off__s0"
    assert by_key[("graddrop", "k=300", "1")]["status"] == "missing"


def test_table_1_values(report_dir):
    runs, _ = load_runs(report_dir)
    table = format_table_1(runs)
    # ew: all epochs 0.30, 0.34 -> 32.00 ± 2.83; last 50% 0.36, 0.38 -> 37.00 ± 1.41
    assert "| Joint Train (ew) | 32.00 ± 2.83 | 37.00 ± 1.41 | 2 |" in table
    # ST: 0.25, 0.27 -> 26.00 ± 1.41, reduction 6.00; 0.28, 0.30 -> 29.00 ± 1.41, reduction 8.00
    assert "| w/ ST (fraction=0.3) | 26.00 ± 1.41 (6.00) | 29.00 ± 1.41 (8.00) | 2 |" in table
    # cagrad with ST raises the incidence: 35.50 -> 37.50 (-2.00), 40.50 -> 43.00 (-2.50)
    assert "| w/ ST (fraction=0.3) | 37.50 ± 0.71 (-2.00) | 43.00 ± 1.41 (-2.50) | 2 |" in table
    assert "STL" not in table
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| Method", "| Joint Train (ew)", "| w/ ST (fraction=0.3)", "| PCGrad",
        "| w/ ST (fraction=0.3)", "| CAGrad", "| w/ ST (fraction=0.3)"]


def test_table_2_values(report_dir):
    runs, _ = load_runs(report_dir)
    table = format_table_2(runs)
    assert ("| Method | left: accuracy ↑ | left: f1 ↑ | right: accuracy ↑ | sum: mae ↓ | Δm% ↓ "
            "| seeds |") in table
    assert "lower is better" in table and "(-1)^u (M - S) / S" in table
    assert "`stl` runs with sparse `off`, mean over seed(s) 0, 1" in table
    # STL row: means 0.91, 0.82, 0.82, 2.1; Δm over its own seeds averages to 0
    stl_row = next(ln for ln in table.splitlines() if ln.startswith("| STL (baseline)"))
    assert stl_row.startswith("| STL (baseline) | 0.9100 ± 0.0141 | 0.8200 ± 0.0283 | "
                              "0.8200 ± 0.0283 | 2.1000 ± 0.1414 | 0.00 ± ")
    # ew off: Δm 5.0 and 0.8333 -> 2.92 ± 2.95; left accuracy 0.819, 0.91 -> 0.8645 ± 0.0643
    ew_row = next(ln for ln in table.splitlines() if ln.startswith("| Joint Train (ew)"))
    assert ew_row == ("| Joint Train (ew) | 0.8645 ± 0.0643 | 0.7995 ± 0.0290 | 0.8610 ± 0.0580 "
                      "| 2.3100 ± 0.2970 | 2.92 ± 2.95 | 2 |")
    # ew with ST equals STL's mean everywhere: Δm exactly 0 on both seeds
    assert "| w/ ST (fraction=0.3) | 0.9100 ± 0.0000 | 0.8200 ± 0.0000 | 0.8200 ± 0.0000 | " \
           "2.1000 ± 0.0000 | 0.00 ± 0.00 | 2 |" in table


def test_table_2_many_tasks_averages_metrics(report_dir):
    runs, _ = load_runs(report_dir)
    table = format_table_2(runs, max_metric_columns=3)
    assert "| accuracy (mean of 2 tasks) ↑ | f1 (mean of 1 tasks) ↑ | mae (mean of 1 tasks) ↓ |" \
        in table
    ew_row = next(ln for ln in table.splitlines() if ln.startswith("| Joint Train (ew)"))
    # accuracy: s0 (0.819 + 0.902) / 2 = 0.8605, s1 (0.91 + 0.82) / 2 = 0.865
    #   -> mean 0.86275, std 0.0045 / sqrt(2) = 0.003182
    mean, std = (float(x) for x in ew_row.split(" | ")[1].split(" ± "))
    assert mean == pytest.approx(0.86275, abs=1e-4) and std == pytest.approx(0.003182, abs=1e-4)


def test_report_md(report_dir):
    text = (report_dir / "report.md").read_text()
    for needle in ("## Table 1", "## Table 2", "## Missing runs", "`mgda__off__s0`",
                   "no result.json", "`graddrop__k-300__s1`", "result.json unreadable",
                   "14 complete run(s), 2 missing", "backbone `cnn`", "4 epoch(s)",
                   "[`summary.csv`](summary.csv)"):
        assert needle in text, needle
    for png in ("incidence_per_epoch.png", "incidence_average.png", "cosine_hist.png",
                "layer_conflicts_ew.png", "layer_conflicts_pcgrad.png",
                "layer_conflicts_cagrad.png", "task_metrics.png"):
        assert f"]({png})" in text, png
    assert "val split" in text
    assert "layer_conflicts_stl.png" not in text


def _check_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82", path
    return struct.unpack(">II", data[16:24])


def test_pngs_are_valid_and_not_blank(report_dir):
    from matplotlib import image

    pngs = sorted(report_dir.glob("*.png"))
    assert [p.name for p in pngs] == sorted([
        "incidence_per_epoch.png", "incidence_average.png", "cosine_hist.png",
        "layer_conflicts_ew.png", "layer_conflicts_pcgrad.png", "layer_conflicts_cagrad.png",
        "task_metrics.png"])
    for p in pngs:
        w, h = _check_png(p)
        assert w >= 300 and h >= 200, p
        pixels = image.imread(p)
        assert pixels.shape[:2] == (h, w) and float(pixels.std()) > 0.01, p


def test_without_stl_delta_m_is_empty_and_said(tmp_path):
    write_grid(tmp_path, stl=False, missing=False)
    text = write_report(tmp_path, plots=False).read_text()
    assert "Δm% not computed: no `stl` (single-task) run" in text
    assert all(r["delta_m"] == "" for r in _summary(tmp_path))
    assert not list(tmp_path.glob("*.png"))


def test_stl_with_sparse_only_is_used_and_named(tmp_path):
    for seed, v in STL.items():
        write_fake_run(tmp_path, "stl", "fraction=0.3", seed, v)
    write_fake_run(tmp_path, "ew", "off", 0, GRID[("ew", "off")][0][:4], (0.3, 0.36))
    runs, _ = load_runs(tmp_path)
    table = format_table_2(runs)
    assert "sparse `fraction=0.3`" in table and "no run with sparse `off` exists" in table
    assert "| STL w/ ST (fraction=0.3) (baseline) |" in table
    assert float(_summary_row(tmp_path, "ew")["delta_m"]) == pytest.approx(5.0)


def _summary_row(root: Path, method: str) -> dict:
    write_report(root, plots=False)
    return next(r for r in _summary(root) if r["method"] == method)


def test_all_runs_missing_still_writes_a_report(tmp_path):
    write_fake_run(tmp_path, "ew", "off", 0, (0.5, 0.5, 0.5, 3.0), (0.4, 0.4), result=False)
    text = write_report(tmp_path).read_text()
    assert "`ew__off__s0`" in text and "No complete run" in text
    assert _summary(tmp_path)[0]["status"] == "missing"


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="out_dir: .*runs is not a directory"):
        write_report(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match="out_dir: no run directory"):
        write_report(tmp_path)
    write_fake_run(tmp_path, "ew", "off", 0, (0.5, 0.5, 0.5, 3.0), (0.4, 0.4))
    write_fake_run(tmp_path, "pcgrad", "off", 0, (0.5, 0.5, 0.5, 3.0), (0.4, 0.4),
                   data="digits-attrs")
    with pytest.raises(ValueError, match="different data sets"):
        write_report(tmp_path)
    dup = tmp_path / "dup"
    write_fake_run(dup, "ew", "off", 0, (0.5, 0.5, 0.5, 3.0), (0.4, 0.4))
    copy = dup / "runs" / "ew_copy"
    copy.mkdir()
    (copy / "result.json").write_text((dup / "runs" / "ew__off__s0" / "result.json").read_text())
    with pytest.raises(ValueError, match="'ew__off__s0' and 'ew_copy' are both method='ew'"):
        write_report(dup)


def test_stl_with_other_tasks_is_an_error(tmp_path):
    write_fake_run(tmp_path, "stl", "off", 0, STL[0])
    run = write_fake_run(tmp_path, "ew", "off", 0, (0.5, 0.5, 0.5, 3.0), (0.4, 0.4))
    res = json.loads((run / "result.json").read_text())
    res["directions"]["sum"]["mae"] = "up"
    (run / "result.json").write_text(json.dumps(res))
    with pytest.raises(ValueError, match="'ew__off__s0': its tasks, metrics or directions differ"):
        write_report(tmp_path, plots=False)


def test_malformed_result_is_missing_with_reason(tmp_path):
    run = write_fake_run(tmp_path, "ew", "off", 0, (0.5, 0.5, 0.5, 3.0), (0.4, 0.4))
    res = json.loads((run / "result.json").read_text())
    del res["directions"]["right"]
    (run / "result.json").write_text(json.dumps(res))
    runs, missing = load_runs(tmp_path)
    assert runs == [] and missing[0].reason.startswith("result.json malformed: directions")
    assert (missing[0].method, missing[0].sparse, missing[0].seed) == ("ew", "off", 0)


def test_parse_run_dir_name():
    assert parse_run_dir_name("pcgrad__fraction-0.3__s1") == ("pcgrad", "fraction=0.3", 1)
    assert parse_run_dir_name("ew__k-300__s0") == ("ew", "k=300", 0)
    assert parse_run_dir_name("stl__off__s12") == ("stl", "off", 12)
    assert parse_run_dir_name("notes") is None


def test_conflict_rows_without_statistics(tmp_path):
    # runs without per-task gradients write only the epoch on their rows; per-layer cells may be
    # empty when per-layer statistics are off: neither is a reading error
    run = write_fake_run(tmp_path, "famo", "off", 0, (0.5, 0.5, 0.5, 3.0), (0.4, 0.4))
    header = "epoch,incidence,mean_cos,gms," + ",".join(f"layer:{n}" for n in LAYERS)
    (run / "conflicts.csv").write_text(header + "\n1\n2\n")
    other = write_fake_run(tmp_path, "ew", "off", 0, (0.5, 0.5, 0.5, 3.0), (0.4, 0.4))
    (other / "conflicts.csv").write_text(header + "\n1,0.4,0.1,0.8,,,\n")
    runs, _ = load_runs(tmp_path)
    famo, ew = sorted(runs, key=lambda r: r.method != "famo")
    assert famo.conflicts is None and famo.notes == []
    assert ew.conflicts.incidence == [0.4] and all(math.isnan(c) for c in ew.conflicts.counts[0])
    text = write_report(tmp_path).read_text()
    assert "layer_conflicts" not in text and "Not drawn (no run recorded per-layer" in text
