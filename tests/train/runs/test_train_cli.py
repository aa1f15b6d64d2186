"""``gradops train`` and ``gradops compare`` end to end (small runs): the run-directory contract,
the config file, determinism, every method with and without sparse training, AMP, timm."""
import csv
import json
import tomllib

import pytest
import torch
from train_helpers import SMALL

from gradops.cli import main
from gradops.train import METHODS, TrainConfig, run_training


def _lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_train_two_epochs_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", "digits", "--method", "pcgrad", "--sparse", "fraction=0.3",
               "--epochs", "2", "--seed", "0", "--out", str(out)] + SMALL)
    assert rc == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("gradops train: pcgrad sparse=fraction=0.3 seed=0: 2 epochs")
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert {k: cfg[k] for k in ("data", "method", "sparse", "seed", "epochs", "backbone")} == \
        {"data": "digits", "method": "pcgrad", "sparse": "fraction=0.3", "seed": 0, "epochs": 2,
         "backbone": "cnn"}
    lines = _lines(out / "metrics.jsonl")
    assert [(ln["epoch"], ln["split"]) for ln in lines] == [
        (1, "train"), (1, "val"), (1, "test"), (2, "train"), (2, "val"), (2, "test")]
    for ln in lines:
        assert set(ln) == {"epoch", "split", "losses", "metrics", "gc", "time_s"}
        assert set(ln["losses"]) == {"left", "right", "sum"}
        assert set(ln["metrics"]["left"]) == {"accuracy", "macro_f1"}
        assert set(ln["metrics"]["sum"]) == {"mae"}
        assert (ln["gc"] is None) == (ln["split"] != "train")
    rows = list(csv.reader((out / "conflicts.csv").open()))
    assert rows[0][:4] == ["epoch", "incidence", "mean_cos", "gms"]
    assert rows[0][4:] == [f"layer:{n}" for n in ("conv1", "bn1", "conv2", "bn2", "conv3",
                                                  "bn3", "fc")]
    assert [r[0] for r in rows[1:]] == ["1", "2"]
    assert float(rows[1][1]) == pytest.approx(lines[0]["gc"])
    res = json.loads((out / "result.json").read_text())
    assert {"method", "sparse", "seed", "data", "epochs", "tasks", "directions", "gc_all",
            "gc_last50", "cosine_hist", "time_s"} <= set(res)
    assert res["tasks"] == lines[-1]["metrics"]
    assert res["directions"]["sum"] == {"mae": "down"}
    assert res["gc_all"] == pytest.approx((lines[0]["gc"] + lines[3]["gc"]) / 2)
    assert res["gc_last50"] == pytest.approx(lines[3]["gc"])
    h = res["cosine_hist"]
    assert len(h["edges"]) == 41 and h["edges"][0] == -1.0 and h["edges"][-1] == 1.0
    steps = 2 * (128 // 32)
    assert len(h["counts"]) == 40 and sum(h["counts"]) == 3 * steps     # 3 pairs per step
    assert (out / "checkpoint.pt").is_file()
    assert not list(out.glob(".*tmp*"))                                 # no temporary left


def test_stl_run_has_no_conflict_statistics(tmp_path):
    res = run_training(TrainConfig(method="stl", epochs=1, train_limit=64, width=4,
                                   batch_size=32), tmp_path / "stl", progress=False, quiet=True)
    assert res["gc_all"] is None and res["gc_last50"] is None and res["cosine_hist"] is None
    assert set(res["tasks"]) == {"left", "right", "sum"}
    rows = (tmp_path / "stl" / "conflicts.csv").read_text().splitlines()
    assert rows == ["epoch,incidence,mean_cos,gms", "1"]


def test_config_file_and_precedence(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('method = "cagrad"\nepochs = 1\n[optimizer]\nlr = 0.01\noptim = "sgd"\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(conf), "--lr", "0.005", "--out", str(out)]
                + SMALL) == 0
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["method"] == "cagrad" and saved["optim"] == "sgd" and saved["lr"] == 0.005
    assert TrainConfig.from_dict(saved).validate() == TrainConfig.from_dict(saved)


def test_same_seed_same_run(tmp_path):
    cfg = TrainConfig(method="graddrop", epochs=1, train_limit=64, width=4, batch_size=32)
    a = run_training(cfg, tmp_path / "a", progress=False, quiet=True)
    b = run_training(cfg, tmp_path / "b", progress=False, quiet=True)
    assert a["tasks"] == b["tasks"] and a["cosine_hist"] == b["cosine_hist"]
    wa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["trainer"]["model"]
    wb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["trainer"]["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = run_training(cfg.replace(seed=1), tmp_path / "c", progress=False, quiet=True)
    assert c["tasks"] != a["tasks"]


@pytest.mark.parametrize("sparse", ["off", "k=5"])
def test_every_method_trains(tmp_path, sparse):
    torch.set_num_threads(1)
    for m in METHODS:
        cfg = TrainConfig(method=m, sparse=sparse, epochs=1, train_limit=64, width=4,
                          batch_size=32, data="digits-attrs" if m == "gradvac" else "digits")
        res = run_training(cfg, tmp_path / m, progress=False, quiet=True)
        assert res["method"] == m and res["sparse"] == sparse
        assert (res["gc_all"] is None) == (m in ("stl", "selective")), m   # no per-task grads
        for task, ms in res["tasks"].items():
            assert all(v == v for v in ms.values()), (m, task, ms)       # finite metrics
        if sparse != "off":
            assert 0 < res["sparse_fraction"] < 1
    # sparse training keeps the unselected encoder entries at their initial values
    if sparse != "off":
        ck = torch.load(tmp_path / "pcgrad" / "checkpoint.pt", weights_only=False)
        w = ck["trainer"]["model"]["encoder.conv2.weight"]
        torch.manual_seed(0)
        init = TrainConfig(width=4)  # same seed -> same initial weights
        from gradops.train.data import load_dataset
        from gradops.train.engine.trainer import Trainer
        from gradops.train.engine.distributed import Dist
        t = Trainer(init.replace(method="pcgrad", sparse=sparse), load_dataset("digits"),
                    torch.device("cpu"), Dist())
        w0 = t.net.encoder.conv2.weight.detach()
        changed = (w != w0).reshape(w.shape[0], -1).sum(1)
        assert int(changed.max()) <= 5                  # k = 5 entries per output neuron


def test_no_stats_ew_computes_no_conflicts(tmp_path):
    res = run_training(TrainConfig(method="ew", stats=False, epochs=1, train_limit=64, width=4,
                                   batch_size=32), tmp_path / "r", progress=False, quiet=True)
    assert res["gc_all"] is None
    assert (tmp_path / "r" / "conflicts.csv").read_text().splitlines()[1:] == ["1"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cpu(tmp_path, amp):
    res = run_training(TrainConfig(method="nashmtl", amp=amp, epochs=1, train_limit=64,
                                   width=4, batch_size=32, clip=1.0), tmp_path / amp,
                       progress=False, quiet=True)
    assert res["gc_all"] is not None


def test_timm_backbone_and_local_weights(tmp_path):
    pytest.importorskip("timm")
    import timm
    enc = timm.create_model("test_efficientnet", pretrained=False, num_classes=0, in_chans=1)
    with torch.no_grad():
        for p in enc.parameters():
            p.fill_(0.01)
    wpath = tmp_path / "enc.pt"
    torch.save(enc.state_dict(), wpath)
    out = tmp_path / "timm"
    assert main(["train", "--backbone", "test_efficientnet", "--weights", str(wpath),
                 "--epochs", "1", "--train-limit", "32", "--batch-size", "16", "--threads", "1",
                 "--no-progress", "--method", "imtlg", "--out", str(out)]) == 0
    assert json.loads((out / "result.json").read_text())["gc_all"] is not None


def test_compare_quick_budget(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--budget", "quick", "--out", str(out), "--no-progress",
                 "--threads", "1", "--train-limit", "128", "--width", "4"]) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["ew__fraction-0.6__s0", "ew__off__s0", "pcgrad__fraction-0.6__s0",
                    "pcgrad__off__s0", "stl__off__s0"]
    for r in runs:
        assert (out / "runs" / r / "result.json").is_file()
    printed = capsys.readouterr().out
    assert "gradops compare: report written to" in printed or "no report written" in printed


def test_compare_acceptance_form(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", "digits", "--methods", "ew,pcgrad,cagrad", "--sparse",
                 "off,fraction=0.3", "--seeds", "0,1", "--epochs", "1", "--out", str(out),
                 "--no-progress", "--threads", "1", "--train-limit", "64", "--width", "4",
                 "--batch-size", "32"]) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2 * (3 * 2 + 1)
    assert "cagrad__fraction-0.3__s1" in runs and "stl__off__s1" in runs
    # --resume keeps finished runs
    before = (out / "runs" / "ew__off__s0" / "result.json").read_text()
    assert main(["compare", "--data", "digits", "--methods", "ew,pcgrad,cagrad", "--sparse",
                 "off,fraction=0.3", "--seeds", "0,1", "--epochs", "1", "--out", str(out),
                 "--no-progress", "--threads", "1", "--train-limit", "64", "--width", "4",
                 "--batch-size", "32", "--resume"]) == 0
    assert (out / "runs" / "ew__off__s0" / "result.json").read_text() == before


@pytest.mark.parametrize("method", ["pcgrad", "pcgrad-layer"])
def test_method_opt_reaches_the_optimizer(method):
    """``--method-opt libmtl_self_visit=true`` (or ``METHOD.libmtl_self_visit=true``, or the
    old config key ``pcgrad_libmtl_self_visit``) reaches MTLOptimizer's method options for
    pcgrad and pcgrad-layer; default False (j != i)."""
    from gradops.train.data import load_dataset
    from gradops.train.engine.distributed import Dist
    from gradops.train.engine.trainer import Trainer
    from gradops.train.config.cli_options import add_config_options, given_options
    import argparse
    p = argparse.ArgumentParser()
    add_config_options(p)
    assert given_options(p.parse_args(["--method-opt", "libmtl_self_visit=true"])) == \
        {"method_opt": "libmtl_self_visit=true"}
    data = load_dataset("digits")
    for flag, cfg in ((False, TrainConfig(method=method, width=4)),
                      (True, TrainConfig(method=method, width=4,
                                         method_opt="libmtl_self_visit=true")),
                      (True, TrainConfig(method=method, width=4,
                                         method_opt=f"{method}.libmtl_self_visit=true")),
                      (True, TrainConfig.from_dict({"method": method, "width": 4,
                                                    "pcgrad_libmtl_self_visit": True}))):
        t = Trainer(cfg.validate(), data, torch.device("cpu"), Dist())
        assert t.opt.method.options.libmtl_self_visit is flag
        assert t.opt.method.kind == ("layer" if method == "pcgrad-layer" else "gram")
