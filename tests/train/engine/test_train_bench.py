"""``gradops.bench.trainer`` (the trainer's epoch-time benchmark) in its quick form: it runs,
prints its table and writes its CSV (timings are not checked: this is not a timed test)."""
import argparse
import csv

import torch

from gradops.bench.trainer import main


def test_bench_trainer_quick(tmp_path, capsys):
    torch.set_num_threads(1)
    path = tmp_path / "trainer.csv"
    args = argparse.Namespace(methods="pcgrad,famo,stl", quick=True, csv=str(path),
                              device="cpu", rounds=1, append=False)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| method | epoch s | x ew |" in printed and "| famo |" in printed
    rows = list(csv.DictReader(path.open()))
    assert [r["method"] for r in rows] == ["ew", "pcgrad", "famo", "stl"]
    for r in rows:
        shares = [float(r[k]) for k in ("fwd_bwd_share", "step_share", "other_share")]
        assert all(0 <= s <= 1 for s in shares[:2]) and abs(sum(shares) - 1) < 1e-2
        assert float(r["epoch_s"]) > 0
    assert float(rows[0]["x_ew"]) == 1.0
