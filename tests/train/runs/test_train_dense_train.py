"""Quick ``gradops train`` runs on each fixture data set (the presets' ``--budget quick``), the
dense models, resume with per-batch augmentation, and the report's published baseline and
epoch choices."""
import json

import pytest
import torch
from dense_fixtures import write_celeba, write_mnist_like, write_mtan

from gradops.cli import main
from gradops.train.models.build import build_model
from gradops.train.models.dense import DilatedResNet, SegNet
from gradops.train.tasks.dense import Depth, Normals, Segmentation
from gradops.train.config.errors import ConfigError
from gradops.train.config.presets import PRESETS, preset_config

FAST = ["--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("dense")
    write_mtan(base / "nyuv2", {"train": 4, "val": 2})
    write_mtan(base / "cityscapes", {"train": 4, "val": 2}, classes=7, normals=False,
               label_folder="label_7")
    write_celeba(base / "celeba")
    write_mnist_like(base / "idx" / "mnist")
    write_mnist_like(base / "idx" / "fashion", seed=1)
    return base


def _summary(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def _lines(path):
    return [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines()]


def test_dense_models_keep_the_resolution_and_name_their_layers():
    tasks = [Segmentation("segmentation", 13), Depth("depth"), Normals("normal")]
    for backbone in ("segnet", "resnet-dilated"):
        net = build_model(backbone, (3, 32, 64), 2, tasks)
        out = net(torch.zeros(2, 3, 32, 64))
        assert {k: tuple(v.shape) for k, v in out.items()} == {
            "segmentation": (2, 13, 32, 64), "depth": (2, 1, 32, 64), "normal": (2, 3, 32, 64)}
    names = [n for n, _ in SegNet(3, 2).named_modules()]
    assert "enc.4.layer2.conv" in names and "dec.0.layer1.bn" in names
    assert "layer3.block1.conv1" in [n for n, _ in DilatedResNet(3, 2).named_modules()]
    with pytest.raises(ConfigError, match="--backbone.*dense backbone"):
        build_model("cnn", (3, 32, 64), 2, tasks)


def test_presets_hold_the_papers_budgets():
    nyu = preset_config("nyuv2-mtan")
    assert {k: nyu[k] for k in ("optim", "lr", "schedule", "step_size", "gamma", "epochs",
                                "batch_size")} == {"optim": "adam", "lr": 1e-4,
                                                   "schedule": "step", "step_size": 100,
                                                   "gamma": 0.5, "epochs": 200, "batch_size": 2}
    assert PRESETS["multi-fashion-recon"]["milestones"] == "60,90"
    quick = preset_config("celeba-famo", "quick")
    assert quick["epochs"] == 2 and quick["train_limit"] == 3 * 256
    with pytest.raises(ConfigError, match="--preset"):
        preset_config("nope")


def test_quick_train_nyuv2_and_resume(roots, tmp_path, capsys):
    out = tmp_path / "nyu"
    argv = ["train", "--preset", "nyuv2-mtan", "--budget", "quick", "--data-root",
            str(roots / "nyuv2"), "--width", "2", "--method", "pcgrad", "--out", str(out)]
    assert main(argv + FAST) == 0
    s = _summary(capsys)
    assert s.startswith("gradops train: pcgrad sparse=off seed=0: 2 epochs") and "miou" in s
    test = [ln for ln in _lines(out) if ln["split"] == "test"][-1]["metrics"]
    assert set(test["normal"]) == {"mean", "median", "within_11_25", "within_22_5", "within_30"}
    assert set(test["depth"]) == {"abs_err", "rel_err"}
    # one epoch, then resume: the same result as the uninterrupted run (augmentation included)
    short = tmp_path / "short"
    assert main(argv[:-1] + [str(short), "--epochs", "1"] + FAST) == 0
    cfg = (short / "config.toml").read_text().replace("epochs = 1\n", "epochs = 2\n")
    (short / "config.toml").write_text(cfg)
    assert main(["train", "--resume", str(short)] + FAST) == 0
    a = json.loads((out / "result.json").read_text())["tasks"]
    b = json.loads((short / "result.json").read_text())["tasks"]
    assert a == b


@pytest.mark.parametrize("argv", [
    ["--preset", "cityscapes-mtan", "--budget", "quick", "--data-root", "cityscapes",
     "--batch-size", "2", "--width", "2", "--backbone", "resnet-dilated"],
    ["--preset", "celeba-famo", "--budget", "quick", "--data-root", "celeba", "--batch-size",
     "3", "--width", "2", "--method", "famo"],
    ["--preset", "multi-fashion-recon", "--budget", "quick", "--data-root", "idx",
     "--batch-size", "12", "--width", "2"],
    ["--data", "multi-mnist", "--data-root", "idx", "--epochs", "1", "--batch-size", "12",
     "--width", "2"],
    ["--data", "multi-fashion-mnist", "--data-root", "idx", "--epochs", "1", "--batch-size",
     "24", "--width", "2", "--method", "stl"],
], ids=["cityscapes", "celeba", "multi-fashion", "multi-mnist", "multi-fashion-mnist"])
def test_quick_train_on_each_fixture(roots, tmp_path, capsys, argv):
    argv = [str(roots / a) if i and argv[i - 1] == "--data-root" else a
            for i, a in enumerate(argv)]
    assert main(["train", "--out", str(tmp_path / "run")] + argv + FAST) == 0
    s = _summary(capsys)
    assert s.startswith("gradops train:") and "test:" in s
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert all(v == v for ms in res["tasks"].values() for v in ms.values())


def test_compare_against_published_stl_with_epoch_choices(roots, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--preset", "nyuv2-mtan", "--budget", "quick", "--data-root",
               str(roots / "nyuv2"), "--width", "2", "--methods", "ew", "--sparse", "off",
               "--seeds", "0", "--baseline", "published", "--jobs", "1", "--out", str(out)]
              + FAST)
    assert rc == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "published STL values of nyuv2" in report
    assert "Which epoch" in report and "last-10 mean" in report
    row = [ln for ln in report.splitlines() if ln.startswith("| ew | off |")]
    assert len(row) == 1 and "—" not in row[0]
