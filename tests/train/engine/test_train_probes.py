"""Gradient probes: per-sample gradients and the epoch statistics against a direct computation
(a loop of autograd.grad per sample and task, numpy statistics) on a tiny model with BatchNorm."""
import numpy as np
import pytest
import torch
from torch import nn

from gradops.train.config.errors import ConfigError
from gradops.train.models.encoders import MTLModel
from gradops.train.config.extras import parse_probe
from gradops.train.engine.probes import GradientProbe, per_sample_task_gradients
from gradops.train.runs.extra_files import write_probes
from gradops.train.tasks.types import Binary, Classification, Regression

TASKS = [Classification("a", n_out=3), Regression("b"), Binary("c")]


def _tiny():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4),
                        nn.ReLU())
    m = MTLModel(enc, 4, TASKS)
    m.train()
    m(torch.randn(16, 5))              # running statistics away from their initial values
    return m


def _data(n=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g)
    ys = {"a": torch.randint(0, 3, (n,), generator=g), "b": torch.randn(n, generator=g),
          "c": torch.randint(0, 2, (n,), generator=g).float()}
    return x, ys


def _direct(m, x, ys):
    shared = list(m.encoder.parameters())
    m.eval()
    rows = []
    for t in TASKS:
        per = []
        for i in range(x.shape[0]):
            out = m(x[i:i + 1])
            loss = t.loss(out[t.name], ys[t.name][i:i + 1])
            gs = torch.autograd.grad(loss, shared)
            per.append(torch.cat([g.reshape(-1) for g in gs]))
        rows.append(torch.stack(per))
    m.train()
    return torch.stack(rows).double().numpy()          # [T, N, P]


def _pairs(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    both = (a != 0) & (b != 0)
    return {"cos": a @ b / (na * nb), "gms": 2 * na * nb / (na ** 2 + nb ** 2),
            "sign_conflict": ((a * b < 0) & both).sum() / both.sum()}


def test_per_sample_gradients_equal_a_loop_of_autograd():
    m = _tiny()
    x, ys = _data()
    rm = m.encoder[1].running_mean.clone()
    g = per_sample_task_gradients(m, list(m.encoder.parameters()), TASKS, x, ys)
    assert m.training and torch.equal(m.encoder[1].running_mean, rm)
    np.testing.assert_allclose(g.double().numpy(), _direct(m, x, ys), rtol=1e-4, atol=1e-6)


def test_epoch_statistics_against_a_direct_computation(tmp_path):
    m = _tiny()
    x, ys = _data(5)
    probe = GradientProbe(every=2, samples=4)
    shared = list(m.encoder.parameters())
    probed = [probe.step(m, shared, TASKS, x, ys) for _ in range(3)]
    assert probed == [True, False, True]
    rows = {(r["setup"], r["measure"]): r for r in probe.end_epoch(1)}
    G = _direct(m, x[:4], {k: v[:4] for k, v in ys.items()})
    T, N = G.shape[:2]
    vals = {}
    for i in range(N):
        for s in range(T):
            for t in range(s + 1, T):
                for k, v in _pairs(G[s, i], G[t, i]).items():
                    vals.setdefault(("inter_task", k), []).append(v)
    for t in range(T):
        for i in range(N):
            for j in range(i + 1, N):
                for k, v in _pairs(G[t, i], G[t, j]).items():
                    vals.setdefault(("inter_sample", k), []).append(v)
    assert set(rows) == set(vals)
    for key, v in vals.items():
        v = np.array(v * 2)                       # probed twice on the same batch
        r = rows[key]
        assert r["n"] == len(v)
        np.testing.assert_allclose([r["mean"], r["std"], r["p2_5"], r["p97_5"]],
                                   [v.mean(), v.std(), np.percentile(v, 2.5),
                                    np.percentile(v, 97.5)], rtol=1e-4, atol=1e-5)
    write_probes(probe, tmp_path)
    assert (tmp_path / "probes.csv").read_text().splitlines()[0] == \
        "epoch,setup,measure,mean,std,p2_5,p97_5,n"
    assert (tmp_path / "probes.png").stat().st_size > 0


def test_parse_probe():
    assert parse_probe("every=5,samples=8") == (5, 8)
    assert parse_probe("samples=4") == (5, 4)
    assert parse_probe("off") is None
    for bad in ("every=0", "often", "samples=1"):
        with pytest.raises(ConfigError, match="--probe"):
            parse_probe(bad)


def test_train_with_probes(tmp_path):
    import csv

    from train_helpers import SMALL

    from gradops.cli import main
    out = tmp_path / "run"
    rc = main(["train", "--data", "digits", "--method", "ew", "--probe", "every=2,samples=4",
               "--epochs", "2", "--out", str(out)] + SMALL)
    assert rc == 0
    rows = list(csv.DictReader((out / "probes.csv").open()))
    assert len(rows) == 2 * 2 * 3
    # 128 samples / batch 32 = 4 steps, probed at steps 1 and 3: 2 probes x 4 samples x 3 pairs
    inter_task = [r for r in rows if r["setup"] == "inter_task" and r["epoch"] == "1"]
    assert all(int(r["n"]) == 2 * 4 * 3 for r in inter_task)
    assert (out / "probes.png").stat().st_size > 0
    assert main(["train", "--probe", "sometimes", "--out", str(tmp_path / "x")] + SMALL) == 2
