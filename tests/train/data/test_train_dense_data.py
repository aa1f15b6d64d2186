"""The loaders of the local data sets on fixtures in their exact formats: shapes, ignore labels,
invalid depth and normals, the augmentation (consistent over targets, flips), the composites of
Multi-MNIST, and the errors for missing and malformed data."""
import numpy as np
import pytest
import torch
from dense_fixtures import (ATTR_NAMES, write_celeba, write_idx, write_mnist_like,
                            write_mtan)

from gradops.cli import main
from gradops.train.data import load_dataset
from gradops.train.data.dense_augment import dense_transform, scale_crop_flip
from gradops.train.data.multi_mnist import compose
from gradops.train.config.errors import ConfigError


@pytest.fixture(scope="module")
def nyu(tmp_path_factory):
    return write_mtan(tmp_path_factory.mktemp("nyuv2"), {"train": 4, "val": 2})


def test_nyuv2_reads_the_mtan_layout(nyu):
    d = load_dataset("nyuv2", str(nyu))
    assert [t.name for t in d.tasks] == ["segmentation", "depth", "normal"]
    tr = d.splits["train"]
    assert tr.x.shape == (4, 3, 32, 64) and tr.x.dtype == torch.float32
    assert d.splits["val"] is d.splits["test"] and len(d.splits["val"]) == 2
    x, ys = tr.batch(torch.tensor([1, 2]))                     # evaluation form
    src = np.load(nyu / "train" / "label" / "1.npy")
    assert ys["segmentation"].dtype == torch.int64
    assert torch.equal(ys["segmentation"][0], torch.from_numpy(src).long())
    assert int(ys["segmentation"].min()) == -1
    assert torch.equal(x[0], torch.from_numpy(np.load(nyu / "train" / "image" / "1.npy")
                                              ).permute(2, 0, 1))
    assert ys["depth"].shape == (2, 1, 32, 64) and float(ys["depth"][:, :, :8].abs().max()) == 0
    assert ys["normal"].shape == (2, 3, 32, 64)


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 12, 16, generator=g)
    seg = torch.randint(-1, 5, (2, 12, 16), generator=g).to(torch.int8)
    depth = torch.rand(2, 1, 12, 16, generator=g) + 1
    depth[:, :, :3] = 0
    normal = torch.nn.functional.normalize(torch.randn(2, 3, 12, 16, generator=g), dim=1)
    normal[..., :4] = 0
    return x, {"seg": seg, "depth": depth, "normal": normal, "disp": depth.clone()}


KINDS = {"seg": "label", "depth": "depth", "normal": "normal", "disp": "inverse_depth"}


def test_flip_is_consistent_and_negates_normals_x():
    x, ys = _batch()
    g = torch.Generator().manual_seed(3)
    xa, ya = scale_crop_flip(x, ys, KINDS, g, scales=(1.0,))
    for b in range(2):
        flipped = not torch.equal(xa[b], x[b])
        ref = x[b].flip(-1) if flipped else x[b]
        assert torch.allclose(xa[b], ref, atol=1e-6)
        seg = ys["seg"][b].flip(-1) if flipped else ys["seg"][b]
        assert torch.equal(ya["seg"][b], seg) and ya["seg"].dtype == torch.int8
        n = ys["normal"][b].flip(-1) if flipped else ys["normal"][b]
        if flipped:
            n = torch.cat([-n[:1], n[1:]])
        assert torch.equal(ya["normal"][b], n)
        d = ys["depth"][b].flip(-1) if flipped else ys["depth"][b]
        assert torch.equal(ya["depth"][b], d)
    # over a few seeds both outcomes occur
    seen = {bool((scale_crop_flip(x, ys, KINDS, torch.Generator().manual_seed(s), (1.0,))[0]
                  != x).any()) for s in range(8)}
    assert seen == {True, False}


def test_scale_crop_rescales_depth_and_keeps_invalid_markers():
    x, ys = _batch()
    ys["depth"][:] = 2.0
    ys["disp"][:] = 0.25
    xa, ya = scale_crop_flip(x, ys, KINDS, torch.Generator().manual_seed(0), scales=(1.5,),
                             flip=False)
    assert xa.shape == x.shape and ya["seg"].shape == ys["seg"].shape
    assert torch.allclose(ya["depth"], torch.full_like(ya["depth"], 2.0 / 1.5))
    assert torch.allclose(ya["disp"], torch.full_like(ya["disp"], 0.25 * 1.5))
    assert set(ya["seg"].unique().tolist()) <= set(range(-1, 5))
    norms = ya["normal"].norm(dim=1)
    # nearest resizing: every vector is either a unit vector or an exact zero (invalid)
    assert torch.all((norms == 0) | ((norms - 1).abs() < 1e-5))
    t = dense_transform(KINDS)
    _, ye = t(x, ys, None)
    assert ye["seg"].dtype == torch.int64 and torch.equal(ye["depth"], ys["depth"])


def test_cityscapes_label_7_and_label_19(tmp_path):
    root = write_mtan(tmp_path / "cs", {"train": 3, "val": 2}, classes=7, normals=False,
                      label_folder="label_7")
    d = load_dataset("cityscapes", str(root))
    assert [t.name for t in d.tasks] == ["segmentation", "depth"] and d.tasks[0].n_out == 7
    with pytest.raises(ConfigError, match="label_19"):
        load_dataset("cityscapes-19", str(root))
    write_mtan(root, {"train": 3, "val": 2}, classes=19, normals=False, label_folder="label_19")
    assert load_dataset("cityscapes-19", str(root)).tasks[0].n_out == 19


def test_celeba_official_files(tmp_path):
    root = write_celeba(tmp_path / "celeba")
    d = load_dataset("celeba", str(root))
    assert [t.name for t in d.tasks] == ATTR_NAMES
    assert {k: len(s) for k, s in d.splits.items()} == {"train": 6, "val": 3, "test": 3}
    tr = d.splits["train"]
    assert tr.x.dtype == torch.uint8 and tr.x.shape == (6, 3, 64, 64)
    x, ys = tr.batch(slice(0, 2))
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    first = (root / "list_attr_celeba.txt").read_text().splitlines()[2].split()
    assert [float(ys[n][0]) for n in ATTR_NAMES] == [1.0 if v == "1" else 0.0 for v in first[1:]]


def test_multi_mnist_composite_by_hand(tmp_path):
    left = np.zeros((1, 28, 28), np.uint8)
    right = np.zeros((1, 28, 28), np.uint8)
    left[0, 27, 27] = 100          # canvas (27, 27): overlaps right's (21, 21)
    right[0, 21, 21] = 200
    right[0, 0, 0] = 50            # canvas (6, 6)
    canvas = compose(left, right, 36)[0]
    assert canvas[27, 27] == 200 and canvas[6, 6] == 50 and canvas.sum() == 250
    small = compose(left, right, 28)[0]
    idx = np.floor((np.arange(28) + 0.5) * 36 / 28).astype(int)
    assert np.array_equal(small, canvas[idx][:, idx])
    root = tmp_path / "mm"
    write_mnist_like(root / "mnist")
    d = load_dataset("multi-mnist", str(root))
    assert {k: len(s) for k, s in d.splits.items()} == {"train": 36, "val": 4, "test": 10}
    assert d.splits["train"].x.shape == (36, 1, 28, 28)
    write_mnist_like(root / "fashion", seed=1)
    d2 = load_dataset("multi-fashion-mnist", str(root))
    assert d2.splits["train"].x.shape == (72, 1, 36, 36) and len(d2.splits["test"]) == 20


def _cli_error(capsys, argv, *words):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def test_missing_and_malformed_data_errors(tmp_path, capsys, nyu):
    base = ["train", "--out", str(tmp_path / "run"), "--no-progress"]
    _cli_error(capsys, base + ["--data", "nyuv2", "--data-root", str(tmp_path / "nope")],
               "--data-root", "nyuv2", "Download", "MTAN", "{train,val}/{image,label,depth,normal}")
    _cli_error(capsys, base + ["--data", "celeba", "--data-root", str(tmp_path)],
               "img_align_celeba", "list_attr_celeba.txt")
    _cli_error(capsys, base + ["--data", "multi-fashion", "--data-root", str(tmp_path)],
               "Fashion-MNIST", "train-images-idx3-ubyte")
    bad = write_mtan(tmp_path / "bad", {"train": 2, "val": 1})
    np.save(bad / "val" / "depth" / "0.npy", np.zeros((32, 64, 2), np.float32))
    _cli_error(capsys, base + ["--data", "nyuv2", "--data-root", str(bad)],
               str(bad / "val" / "depth" / "0.npy"), "shape 32x64x2")
    np.save(bad / "val" / "depth" / "0.npy", np.zeros((32, 64, 1), np.float32))
    np.save(bad / "train" / "label" / "1.npy", np.full((32, 64), 13.0, np.float32))
    _cli_error(capsys, base + ["--data", "nyuv2", "--data-root", str(bad)],
               "label" + "/1.npy", "0..12")
    (bad / "train" / "normal" / "1.npy").unlink()
    np.save(bad / "train" / "label" / "1.npy", np.zeros((32, 64), np.float32))
    _cli_error(capsys, base + ["--data", "nyuv2", "--data-root", str(bad)],
               "no file train/normal/1.npy")
    mm = tmp_path / "mm"
    write_mnist_like(mm / "mnist")
    write_idx(mm / "mnist" / "t10k-labels-idx1-ubyte", np.zeros((3, 2)))
    _cli_error(capsys, base + ["--data", "multi-mnist", "--data-root", str(mm)],
               "t10k-labels-idx1-ubyte", "IDX")
    (mm / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    _cli_error(capsys, base + ["--data", "multi-mnist", "--data-root", str(mm)],
               "no file t10k-labels-idx1-ubyte")
