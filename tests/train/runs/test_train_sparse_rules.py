"""The default grid (the ST paper's random-init protocol), ``--sparse`` with selection rules and
bare fractions, the masks each rule gives a trainer, the fraction-sweep plot, and the
channels-last layout of the built-in CNN."""
from __future__ import annotations

import pytest
import torch
from fake_runs import write_fake_run

from gradops.cli import main
from gradops.sparse import METHODS as SPARSE_METHODS
from gradops.sparse import row_counts
from gradops.train import BUDGETS, ConfigError, TrainConfig
from gradops.train.config.schema import (SPARSE_RULES, canonical_sparse, parse_sparse,
                                         parse_sparse_rule)
from gradops.train.data import load_dataset
from gradops.train.engine.distributed import Dist
from gradops.train.engine.trainer import Trainer
from gradops.train.report.build import write_report
from gradops.train.report.sweep import sweep_points


# --- the default grid ------------------------------------------------------------------------
def test_compare_without_options_is_the_random_init_protocol(tmp_path, monkeypatch):
    seen = {}

    def fake_run_grid(cfg, methods, sparses, seeds, out, **kw):
        seen.update(cfg=cfg, methods=methods, sparses=sparses, seeds=seeds, jobs=kw["jobs"])
        return []

    monkeypatch.setattr("gradops.train.run_grid", fake_run_grid)
    assert main(["compare", "--out", str(tmp_path / "cmp"), "--no-progress"]) == 0
    assert seen["methods"] == ["ew", "pcgrad", "cagrad", "graddrop", "mgda", "imtlg",
                               "nashmtl", "famo"]
    assert seen["sparses"] == ["off", "fraction=0.6"]
    assert seen["seeds"] == [0, 1, 2] and seen["jobs"] == 2
    cfg = seen["cfg"]
    assert (cfg.width, cfg.epochs, cfg.threads, cfg.backbone, cfg.data) == \
        (32, 8, 1, "cnn", "digits")
    # the pretrained-encoder setting stays one option away
    assert main(["compare", "--out", str(tmp_path / "cmp2"), "--no-progress",
                 "--sparse", "off,0.3"]) == 0
    assert seen["sparses"] == ["off", "0.3"]
    assert BUDGETS["default"]["config"]["width"] == 32


# --- --sparse parsing ------------------------------------------------------------------------
def test_sparse_rules_are_the_sparse_modules():
    assert SPARSE_RULES == SPARSE_METHODS


@pytest.mark.parametrize("value, parsed, canonical", [
    ("off", (None, "off", None), "off"),
    ("k=30", ("psn", "k", 30), "k=30"),
    ("fraction=0.3", ("psn", "fraction", 0.3), "fraction=0.3"),
    ("0.6", ("psn", "fraction", 0.6), "fraction=0.6"),
    ("psn:0.6", ("psn", "fraction", 0.6), "psn:fraction=0.6"),
    ("random:0.6", ("random", "fraction", 0.6), "random:fraction=0.6"),
    ("global:fraction=0.45", ("global", "fraction", 0.45), "global:fraction=0.45"),
    ("reverse:k=3", ("reverse", "k", 3), "reverse:k=3"),
])
def test_parse_sparse_rule(value, parsed, canonical):
    assert parse_sparse_rule(value) == parsed
    assert parse_sparse(value) == parsed[1:]
    assert canonical_sparse(value) == canonical


@pytest.mark.parametrize("value, words", [
    ("magnitude:0.6", "unknown selection rule 'magnitude'"),
    ("1.5", "malformed value '1.5'"), ("0", "malformed value '0'"),
    ("random:off", "malformed value 'random:off'"), ("random:", "malformed"),
    ("k=0", "malformed"), ("", "malformed")])
def test_bad_sparse_values_name_the_option(value, words):
    with pytest.raises(ConfigError, match=words) as e:
        parse_sparse_rule(value)
    assert str(e.value).startswith("--sparse")


def test_compare_refuses_a_bad_rule_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--sparse", "off,best:0.6", "--out", str(out),
                 "--no-progress"]) == 2
    assert "--sparse: unknown selection rule 'best'" in capsys.readouterr().err
    assert not out.exists()


# --- the masks of each rule in a trainer -----------------------------------------------------
def _masks(sparse: str, seed: int = 0):
    cfg = TrainConfig(method="pcgrad", sparse=sparse, width=4, seed=seed, train_limit=128,
                      batch_size=32, threads=1).validate()
    tr = Trainer(cfg, load_dataset("digits"), torch.device("cpu"), Dist())
    st = tr.opt.optimizer                            # the SparseTraining inside MTLOptimizer
    enc = tr.net.encoder
    weights = {n: m.weight for n, m in enc.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    out = {}
    for n, w in weights.items():
        m = st.trainable_mask(w)                     # None: every entry trainable
        out[n] = (w.detach().clone(), torch.ones(w.shape, dtype=torch.bool) if m is None else m)
    return out, tr.sparse_fraction


def _per_row_k(masks) -> dict[str, int]:
    out = {}
    for n, (_, m) in masks.items():
        c = row_counts(m)
        assert bool((c == c[0]).all()), n            # the same count in every row
        out[n] = int(c[0])
    return out


def test_the_four_selection_rules_give_the_right_counts_and_magnitudes():
    psn, f_psn = _masks("psn:0.6")
    k = _per_row_k(psn)
    fan_in = {n: w[0].numel() for n, (w, _) in psn.items()}
    K = max(k.values())
    assert k == {n: min(K, f) for n, f in fan_in.items()}      # per-neuron top-K, K = min(k, F)
    assert 0.5 < f_psn < 0.7
    for n, (w, m) in psn.items():                 # each row keeps its K largest |W|
        rows, keep = w.abs().reshape(w.shape[0], -1), m.reshape(w.shape[0], -1)
        lo = torch.where(keep, rows, torch.full_like(rows, float("inf"))).min(1).values
        hi = torch.where(keep, torch.full_like(rows, -1.0), rows).max(1).values
        assert bool((lo >= hi).all()), n

    rev, f_rev = _masks("reverse:0.6")
    assert _per_row_k(rev) == k and f_rev == f_psn
    for n, (w, m) in rev.items():                 # each row keeps its K smallest |W|
        rows, keep = w.abs().reshape(w.shape[0], -1), m.reshape(w.shape[0], -1)
        hi = torch.where(keep, rows, torch.full_like(rows, -1.0)).max(1).values
        lo = torch.where(keep, torch.full_like(rows, float("inf")), rows).min(1).values
        assert bool((hi <= lo).all()), n

    rnd, f_rnd = _masks("random:0.6")
    assert _per_row_k(rnd) == k and f_rnd == f_psn
    assert any(not torch.equal(rnd[n][1], psn[n][1]) for n in psn)
    rnd_again, _ = _masks("random:0.6")           # a function of the seed
    assert all(torch.equal(rnd[n][1], rnd_again[n][1]) for n in rnd)
    rnd_s1, _ = _masks("random:0.6", seed=1)
    assert any(not torch.equal(rnd[n][1], rnd_s1[n][1]) for n in rnd)

    glob, f_glob = _masks("global:0.6")
    assert f_glob == f_psn
    total = sum(int(m.sum()) for _, m in psn.values())
    assert sum(int(m.sum()) for _, m in glob.values()) == total
    kept = torch.cat([w.abs().reshape(-1)[m.reshape(-1)] for w, m in glob.values()])
    dropped = torch.cat([w.abs().reshape(-1)[~m.reshape(-1)] for w, m in glob.values()])
    assert float(kept.min()) >= float(dropped.max())           # the largest |W| overall
    assert len({int(c) for _, m in glob.values() for c in row_counts(m)}) > 1


# --- the fraction sweep plot -----------------------------------------------------------------
VALS = {"off": (0.90, 0.80, 0.80, 2.0, 0.30), "fraction=0.1": (0.70, 0.60, 0.60, 3.0, 0.20),
        "fraction=0.3": (0.85, 0.75, 0.75, 2.4, 0.22), "fraction=0.6": (0.90, 0.80, 0.82, 2.1,
                                                                        0.25)}


def _sweep_dir(root, sparses):
    for seed in (0, 1):
        write_fake_run(root, "stl", "off", seed, (0.9, 0.8, 0.8, 2.0))
        for s in sparses:
            v = VALS[s]
            write_fake_run(root, "ew", s, seed, v[:4], (v[4] + 0.01 * seed, v[4]))
    return root


def test_fraction_sweep_plot_is_written(tmp_path):
    root = _sweep_dir(tmp_path, list(VALS))
    report = write_report(root).read_text()
    png = root / "fraction_sweep.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![incidence and delta m against the trainable fraction](fraction_sweep.png)" in report
    from gradops.train.report.data import load_runs
    runs, _ = load_runs(root)
    pts = sweep_points(runs, lambda r: 0.0)
    assert list(pts) == [("ew", "psn")]
    assert [p[0] for p in pts[("ew", "psn")]] == [0.1, 0.3, 0.6, 1.0]
    assert pts[("ew", "psn")][0][1] == pytest.approx([20.0, 21.0])      # incidence, %


def test_fraction_sweep_needs_three_fractions(tmp_path):
    root = _sweep_dir(tmp_path, ["off", "fraction=0.6"])
    report = write_report(root).read_text()
    assert not (root / "fraction_sweep.png").exists()
    assert "fewer than 3 trainable fractions" in report


# --- channels-last: the same model up to float32 rounding ------------------------------------
def test_channels_last_cnn_matches_contiguous_within_rounding():
    data = load_dataset("digits")
    outs = {}
    for fmt in ("contiguous", "channels_last"):
        cfg = TrainConfig(method="ew", width=4, train_limit=64, batch_size=32, threads=1,
                          memory_format=fmt).validate()
        tr = Trainer(cfg, data, torch.device("cpu"), Dist())
        conv = tr.net.encoder.conv2.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == (fmt == "channels_last")
        line = tr.evaluate(1, "val")
        outs[fmt] = line
    a, b = outs["contiguous"], outs["channels_last"]
    for t in a["losses"]:
        assert b["losses"][t] == pytest.approx(a["losses"][t], rel=1e-5)
    auto = TrainConfig(width=4).validate()
    from gradops.train.engine.trainer import memory_format
    assert memory_format(auto, torch.device("cpu")) == torch.channels_last
    assert memory_format(auto.replace(backbone="mlp"), torch.device("cpu")) == \
        torch.contiguous_format
    with pytest.raises(ConfigError, match="--memory-format"):
        TrainConfig(memory_format="nhwc").validate()
