"""The per-epoch conflict statistics against hand-computed values, and the TOML round trip of the
configuration."""
import math
import tomllib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradops.train.config.schema import TrainConfig, parse_sparse, to_toml
from gradops.train.config.errors import ConfigError
from gradops.train.engine.stats import ConflictStats, layer_index


def test_conflict_stats_by_hand():
    # three tasks: g0 = (1, 0), g1 = (-1, 1), g2 = (0, 2): cos01 = -1/sqrt2, cos02 = 0,
    # cos12 = 1/sqrt2; one conflicting pair of three
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0]])
    G = J @ J.T
    # two parameters (one column each) owned by layers a, b: per-layer Grams
    Gl = torch.stack([J[:, :1] @ J[:, :1].T, J[:, 1:] @ J[:, 1:].T])
    s = ConflictStats(3, torch.device("cpu"), ["a", "b"], [0, 1])
    s.add(SimpleNamespace(gram=G, layer_gram=Gl))
    s.add(SimpleNamespace(gram=G, layer_gram=Gl))
    s.add(SimpleNamespace(gram=None, layer_gram=None))       # a step without per-task grads
    r = s.read()
    assert r["incidence"] == pytest.approx(1 / 3)
    assert r["mean_cos"] == pytest.approx((-1 / math.sqrt(2) + 0 + 1 / math.sqrt(2)) / 3)
    n = [1.0, math.sqrt(2), 2.0]
    gms = [2 * n[i] * n[j] / (n[i] ** 2 + n[j] ** 2) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert r["gms"] == pytest.approx(sum(gms) / 3)
    # layer a (first column: 1, -1, 0): pair (0, 1) conflicts; layer b (0, 1, 2): none; 2 steps
    assert r["layers"] == {"a": 2, "b": 0}
    hist = r["hist"]
    assert sum(hist) == 6 and hist[int((-1 / math.sqrt(2) + 1) * 20)] == 2
    assert hist[20] == 2 and hist[int((1 / math.sqrt(2) + 1) * 20)] == 2
    s.reset()
    assert s.read() is None


def test_layer_index_groups_a_modules_parameters():
    enc = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    names, index = layer_index(enc, list(enc.parameters()))
    assert names == ["0", "2"] and index == [0, 0, 1, 1]


def test_config_toml_round_trip_and_checks():
    cfg = TrainConfig(method="famo", sparse="k=300", lr=3e-4, data_root='a "quoted" \\ path')
    back = TrainConfig.from_dict(tomllib.loads(to_toml(cfg.to_dict(), "header\nline 2")))
    assert back == cfg
    assert parse_sparse("fraction=0.3") == ("fraction", 0.3)
    assert parse_sparse("k=300") == ("k", 300)
    for bad in ("k=0", "fraction=0", "k=1.5", "on", "fraction="):
        with pytest.raises(ConfigError, match="--sparse"):
            parse_sparse(bad)
    with pytest.raises(ConfigError, match="--lr: expected float"):
        TrainConfig(lr="fast").validate()
    with pytest.raises(ConfigError, match="--config: .*unknown key 'nope'"):
        TrainConfig.from_dict({"nope": 1})
    assert TrainConfig(lr=1).validate().lr == 1.0
