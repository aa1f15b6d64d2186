"""Recon: branching (forward equality with copied weights, gradients reach only the own copy,
parameter counts, fx and replay modes, a timm backbone), the scores against the pair loop, and
the search command end to end."""
import json

import pytest
import torch
from train_helpers import SMALL
from torch import nn

from gradops import offsets_from_numels
from gradops.cli import main
from gradops.train.models.encoders import MTLModel, build_encoder
from gradops.train.recon import (BranchedEncoder, CosineBins, LayerScores, branch_model,
                                 branch_report, fused_scores, layer_names, pair_loop_scores,
                                 read_ranking, top_layers)
from gradops.train.tasks.types import Classification, Regression

TASKS = [Classification("a", n_out=10), Classification("b", n_out=10), Regression("c")]


def _model(seed=0):
    torch.manual_seed(seed)
    enc, feat = build_encoder("cnn", (1, 14, 14), 4)
    return MTLModel(enc, feat, TASKS)


@pytest.mark.parametrize("mode", ["fx", "replay"])
def test_forward_equals_unbranched_with_copied_weights(mode):
    m = _model()
    b = branch_model(m, ["conv2", "bn2", "fc"], init="copy", mode=mode)
    assert b.encoder.mode == mode
    x = torch.randn(6, 1, 14, 14)
    for train in (False, True):     # eval first: a train forward updates running statistics
        m.train(train)
        b.train(train)
        o0, o1 = m(x), b(x)
        for k in o0:
            torch.testing.assert_close(o1[k], o0[k], rtol=0, atol=0)


def test_a_tasks_gradient_reaches_only_its_own_copy():
    m = _model()
    b = branch_model(m, ["conv1", "fc"], init="copy")
    x = torch.randn(4, 1, 14, 14)
    out = b(x)
    out["b"].pow(2).sum().backward()
    enc = b.encoder
    for t in range(3):
        for p in enc.task_parameters(t):
            if t == 1:
                assert p.grad is not None and p.grad.abs().sum() > 0
            else:
                assert p.grad is None
    assert all(p.grad is not None for p in enc.shared_parameters())
    assert b.heads["a"].weight.grad is None


def test_parameter_counts_as_reported():
    m = _model()
    layers = ["conv2", "bn3", "fc"]
    b = branch_model(m, layers, init="reinit")
    rep = branch_report(m.encoder, b.encoder, torch.randn(2, 1, 14, 14))
    own = {n: sum(p.numel() for p in dict(m.encoder.named_modules())[n].parameters(False))
           for n in layers}
    p0 = sum(p.numel() for p in m.encoder.parameters())
    assert rep["params_unbranched"] == p0
    assert rep["params_per_layer"] == own
    assert rep["params_branched"] == p0 + 2 * sum(own.values())
    assert rep["params_branched"] == sum(p.numel() for p in b.encoder.parameters())
    assert len(b.encoder.shared_parameters()) == len(list(m.encoder.parameters())) - 6
    # fx: the layers before conv2 run once, so FLOPs grow by less than T-fold
    assert 0 < rep["flops_growth"] < 2
    # reinit: independent draws per task (the paper retrains the branched network)
    w = [b.encoder.branches["conv2"][t].weight for t in range(3)]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


def test_branched_batchnorm_keeps_running_stats_per_task():
    m = _model()
    b = branch_model(m, ["bn1"], init="copy")
    b.train()
    b(torch.randn(8, 1, 14, 14))
    rm = [b.encoder.branches["bn1"][t].running_mean for t in range(3)]
    assert not torch.equal(rm[0], torch.zeros_like(rm[0]))
    torch.testing.assert_close(rm[0], rm[1])      # same input stream up to bn1
    assert "base.bn1.running_mean" not in b.state_dict()


def test_timm_backbone():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    r = timm.create_model("resnet10t", pretrained=False, num_classes=0, in_chans=1)
    names = layer_names(r)
    br = BranchedEncoder(r, ["layer2.0.conv1", "layer3.0.bn2"], 2, init="copy")
    assert br.mode == "fx" and "layer2.0.conv1" in names
    r.eval()
    br.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = r(x)
        for h in br(x):
            torch.testing.assert_close(h, ref)
    # a model torch.fx cannot trace runs in replay mode (auto), and refuses mode="fx"
    v = timm.create_model("test_vit", pretrained=False, num_classes=0, in_chans=1)
    bv = BranchedEncoder(v, ["", "blocks.0.attn.qkv"], 2, init="copy")
    assert bv.mode == "replay" and bv.trace_error
    v.eval()
    bv.eval()
    x = torch.randn(1, 1, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(bv(x)[1], v(x))
    with pytest.raises(ValueError, match="mode='replay'"):
        BranchedEncoder(v, ["blocks.0.attn.qkv"], 2, init="copy", mode="fx")


def test_bad_arguments_name_themselves():
    enc = _model().encoder
    with pytest.raises(ValueError, match="layers"):
        BranchedEncoder(enc, ["relu1"], 2)
    with pytest.raises(ValueError, match="init"):
        BranchedEncoder(enc, ["conv1"], 2, init="zero")
    with pytest.raises(ValueError, match="num_tasks"):
        BranchedEncoder(enc, ["conv1"], 0)
    with pytest.raises(ValueError, match="reset_parameters"):
        BranchedEncoder(nn.Sequential(_Raw()), ["0"], 2, init="reinit")


class _Raw(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w


def test_scores_equal_the_pair_loop_and_accumulate_on_device():
    g = torch.Generator().manual_seed(1)
    numels = [5, 40, 1, 300]
    J = torch.randn(4, sum(numels), generator=g)
    J[:, 40:45] = 0.0                                   # a layer part with zero gradients
    off = offsets_from_numels(numels)
    for S in (0.0, -0.02, -0.3):
        assert fused_scores(J, off, S).tolist() == pair_loop_scores(J, off, S)
    # per-parameter Grams summed into layers: params 0,1 -> layer 0, params 2,3 -> layer 1
    from gradops import segment_gram
    sc = LayerScores([0, 0, 1, 1], 2, -0.02)
    sc.add(segment_gram(J, off))
    lay = offsets_from_numels([45, 301])
    assert sc.counts.tolist() == pair_loop_scores(J, lay, -0.02)
    bins = CosineBins(4)
    G = torch.tensor([[1.0, 0.5, -0.005, -0.5], [0.5, 1.0, -0.015, 0.0],
                      [-0.005, -0.015, 1.0, -0.025], [-0.5, 0.0, -0.025, 1.0]])
    bins.add(G)
    assert bins.counts.tolist() == [1, 2, 1, 1, 1]


def test_search_command_writes_the_ranking(tmp_path):
    out = tmp_path / "search"
    rc = main(["recon", "search", "--data", "digits", "--method", "ew", "--iters", "6",
               "--S", "-0.02", "--out", str(out)] + SMALL)
    assert rc == 0
    ranking = json.loads((out / "ranking.json").read_text())
    enc, _ = build_encoder("cnn", (1, 14, 14), 4)
    assert sorted(r["layer"] for r in ranking) == sorted(layer_names(enc))
    scores = [r["score"] for r in ranking]
    assert scores == sorted(scores, reverse=True) and max(scores) <= 6 * 3
    mods = dict(enc.named_modules())
    assert all(r["params"] == sum(p.numel() for p in mods[r["layer"]].parameters(False))
               for r in ranking)
    assert (out / "scores.png").stat().st_size > 0
    assert top_layers(read_ranking(out / "ranking.json"), 2) == [r["layer"] for r in ranking[:2]]
    assert main(["recon", "search", "--data", "digits", "--iters", "0", "--out",
                 str(tmp_path / "x")] + SMALL) == 2


def test_train_with_recon_and_sparse_training(tmp_path):
    rank = tmp_path / "ranking.json"
    rank.write_text(json.dumps([{"layer": "conv2", "score": 9, "params": 0},
                                {"layer": "fc", "score": 5, "params": 0},
                                {"layer": "bn1", "score": 1, "params": 0}]))
    out = tmp_path / "run"
    rc = main(["train", "--data", "digits", "--method", "pcgrad", "--recon", str(rank),
               "--recon-topk", "2", "--sparse", "k=5", "--epochs", "1", "--out", str(out)]
              + SMALL)
    assert rc == 0
    rep = json.loads((out / "recon.json").read_text())
    assert rep["layers"] == ["conv2", "fc"] and rep["mode"] == "fx"
    sd = torch.load(out / "checkpoint.pt", weights_only=False)["trainer"]["model"]
    n_model = sum(v.numel() for k, v in sd.items() if "running" not in k and
                  "num_batches" not in k and not k.startswith("heads."))
    assert n_model == rep["params_branched"]
    assert {f"encoder.branches.conv2.{t}.weight" for t in range(3)} <= set(sd)
    res = json.loads((out / "result.json").read_text())
    assert 0 < res["sparse_fraction"] < 1 and res["gc_all"] is not None
    for bad in (["--recon-topk", "4"], ["--recon-topk", "0"]):
        assert main(["train", "--recon", str(rank), "--out", str(tmp_path / "x")] + bad
                    + SMALL) == 2
    assert main(["train", "--recon-topk", "2", "--out", str(tmp_path / "y")] + SMALL) == 2


def test_search_compare_and_branching_on_a_dense_model(tmp_path):
    """The search, the before/after table and ``train --recon`` also run on the dense models
    (the trainer's own network, batches through the split's transform), on an NYUv2 fixture."""
    from dense_fixtures import write_mtan
    root = tmp_path / "nyuv2"
    write_mtan(root, {"train": 4, "val": 2})
    data = ["--data", "nyuv2", "--data-root", str(root), "--backbone", "segnet", "--width", "2",
            "--batch-size", "2", "--threads", "1"]
    search = tmp_path / "search"
    assert main(["recon", "search", "--method", "ew", "--iters", "3", "--S", "-0.02",
                 "--out", str(search), "--no-progress"] + data) == 0
    ranking = json.loads((search / "ranking.json").read_text())
    assert len(ranking) > 10 and any(r["layer"].startswith("dec.") for r in ranking)
    assert main(["recon", "compare", "--ranking", str(search / "ranking.json"), "--topk", "2",
                 "--iters", "2", "--seeds", "0", "--out", str(tmp_path / "cmp")] + data) == 0
    table = json.loads((tmp_path / "cmp" / "s0" / "conflict_table.json").read_text())
    for col in table["columns"].values():
        assert abs(sum(col.values()) - 100.0) < 1e-6
    out = tmp_path / "run"
    assert main(["train", "--preset", "nyuv2-mtan", "--budget", "quick", "--data-root", str(root),
                 "--width", "2", "--recon", str(search / "ranking.json"), "--recon-topk", "2",
                 "--method", "pcgrad", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    rep = json.loads((out / "recon.json").read_text())
    assert rep["layers"] == [r["layer"] for r in ranking[:2]]
    assert rep["params_branched"] > rep["params_unbranched"] and rep["params_growth"] > 0


def test_compare_over_seeds_writes_table6_per_seed_and_the_paired_change(tmp_path, capsys):
    """``recon compare --seeds``: a search per seed (no --ranking) or a given ranking, Recon's
    Table 6 per seed, the paired after - before change and the verdict of report_verdicts."""
    from gradops.train.report.verdicts import verdict
    out = tmp_path / "cmp"
    assert main(["recon", "compare", "--seeds", "0,1", "--iters", "3", "--out", str(out)]
                + SMALL) == 0
    console = capsys.readouterr().out
    md = (out / "report.md").read_text()
    summary = json.loads((out / "recon_compare.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["iters"] == 3 and summary["topk"] == 2
    diffs = []
    for t in summary["tables"]:
        s = t["seed"]
        assert f"## Seed {s}" in md and f"s{s}/search/" in t["ranking_source"]
        assert (out / f"s{s}" / "search" / "ranking.json").is_file()
        assert json.loads((out / f"s{s}" / "conflict_table.json").read_text())["seed"] == s
        ranking = json.loads((out / f"s{s}" / "search" / "ranking.json").read_text())
        assert t["branched"] == [r["layer"] for r in ranking[:2]]
        for col in t["columns"].values():
            assert abs(sum(col.values()) - 100.0) < 1e-6
        b, a = t["severe_share"]["before_remaining"], t["severe_share"]["after_remaining"]
        diffs.append(a - b)
        row = f"| {s} | {', '.join(t['branched'])} | {b:.2f} | {a:.2f} |"
        assert row in md
    assert "| **cos < -0.02** |" in md and "## Does it reproduce?" in md
    v = verdict(diffs, "<0")
    assert f"verdict: **{v}**" in md and f"verdict on Recon's claim: {v}" in console
    assert md in console
    # a given ranking serves every seed
    rank = tmp_path / "ranking.json"
    rank.write_text(json.dumps([{"layer": "fc", "score": 9, "params": 0},
                                {"layer": "conv1", "score": 5, "params": 0}]))
    out2 = tmp_path / "cmp2"
    assert main(["recon", "compare", "--ranking", str(rank), "--topk", "1", "--seeds", "3,4",
                 "--iters", "2", "--out", str(out2)] + SMALL) == 0
    tables = json.loads((out2 / "recon_compare.json").read_text())["tables"]
    assert [t["seed"] for t in tables] == [3, 4]
    assert all(t["branched"] == ["fc"] and t["ranking_source"] == f"given: {rank}"
               for t in tables)
    assert not (out2 / "s3" / "search").exists()


def test_recon_verdict_is_report_verdicts_rule():
    """The paired change's verdict is :func:`gradops.train.report.verdicts.verdict` on the
    per-seed after - before differences (hand-made tables)."""
    from gradops.train.report.recon_seeds import format_recon_report, paired_change
    from gradops.train.report.verdicts import verdict
    bins = ["(0, 1]", "[-0.01, 0]", "[-0.02, -0.01)", "[-0.03, -0.02)", "[-1, -0.03)"]

    def table(seed, before, after):
        col = {b: 0.0 for b in bins}
        cols = {"before_all": dict(col, **{"(0, 1]": 100 - before, "[-1, -0.03)": before}),
                "before_remaining": dict(col, **{"(0, 1]": 100 - before,
                                                 "[-1, -0.03)": before}),
                "after_remaining": dict(col, **{"(0, 1]": 100 - after, "[-1, -0.03)": after})}
        return {"seed": seed, "bins": bins, "columns": cols, "branched": ["fc"],
                "remaining_layers": ["conv1"], "ranking_source": "given", "iters": 1,
                "time_s": 0.0, "severe_share": {"before_all": before,
                                                "before_remaining": before,
                                                "after_remaining": after}}

    cases = {"holds": [(20, 10), (22, 11), (18, 10)],
             "does not hold": [(17.4, 17.9), (17, 18), (16, 17.2)],
             "inconclusive": [(20, 10), (20, 21), (20, 12)]}
    for want, pairs in cases.items():
        tables = [table(s, b, a) for s, (b, a) in enumerate(pairs)]
        p = paired_change(tables)
        assert p.diffs == {s: a - b for s, (b, a) in enumerate(pairs)}
        assert p.verdict == verdict([a - b for b, a in pairs], "<0") == want
        assert f"verdict: **{want}**" in format_recon_report(tables, [])
    assert paired_change([table(0, 20, 1)]).verdict == "inconclusive"    # one seed


@pytest.mark.parametrize("seeds", ["", ",", "0,0", "a"])
def test_compare_bad_seeds_is_one_line_exit_2(tmp_path, capsys, seeds):
    out = tmp_path / "cmp"
    assert main(["recon", "compare", "--seeds", seeds, "--out", str(out)] + SMALL) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seeds" in err
    assert not out.exists()
