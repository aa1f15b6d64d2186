"""gradops.sparse: PSN masks, the rules of which parameter gets which mask, the fraction search,
the ablation baselines (random / global / reverse), reports, and timm models
(docs/methods.md#sparse-training)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradops import sparse
from gradops.reference import topk_mask_reference
from gradops.sparse import SparseMasks, mask_indices, psn_masks, row_counts

try:
    import timm
except ImportError:  # timm comes with requirements-dev.txt; without it the model tests skip
    timm = None

needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed (pip install timm; "
                                "it is in requirements-dev.txt)")


class Toy(nn.Module):
    """Every kind of parameter the rules distinguish."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 16))
        self.conv = nn.Conv2d(3, 16, 3)                 # F = 27
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, groups=16)       # F = 9
        self.fc1 = nn.Linear(16, 40)
        self.ln = nn.LayerNorm(40)
        self.fc2 = nn.Linear(40, 16, bias=False)
        self.attn = nn.MultiheadAttention(16, 2)
        self.gamma = nn.Parameter(torch.ones(16))       # a layer-scale: "other"
        self.emb = nn.Embedding(10, 16)
        self.conv1d = nn.Conv1d(4, 6, 2)
        self.conv3d = nn.Conv3d(2, 3, (1, 2, 2))


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return Toy()


def test_default_rules(toy):
    m = psn_masks(toy, k=5)
    assert m.rules == {
        "cls_token": "frozen", "pos_embed": "frozen",
        "conv.weight": "sparse", "conv.bias": "trainable",
        "bn.weight": "frozen", "bn.bias": "frozen",
        "dw.weight": "sparse", "dw.bias": "trainable",
        "fc1.weight": "sparse", "fc1.bias": "trainable",
        "ln.weight": "frozen", "ln.bias": "frozen",
        "fc2.weight": "sparse",
        "attn.in_proj_weight": "sparse", "attn.in_proj_bias": "trainable",
        "attn.out_proj.weight": "sparse", "attn.out_proj.bias": "trainable",
        "gamma": "trainable", "emb.weight": "trainable",
        "conv1d.weight": "sparse", "conv1d.bias": "trainable",
        "conv3d.weight": "sparse", "conv3d.bias": "trainable",
    }
    params = dict(toy.named_parameters())
    for n, mask in m.items():
        rule = m.rules[n]
        if rule == "trainable":
            assert mask is None
            continue
        assert mask.dtype == torch.bool and mask.shape == params[n].shape
        if rule == "frozen":
            assert not mask.any()
        else:
            F = params[n][0].numel()
            assert torch.equal(row_counts(mask), torch.full((mask.shape[0],), min(5, F)))
            assert torch.equal(mask, topk_mask_reference(params[n].detach(), 5))


def test_top_k_keeps_largest_per_row_and_ties_go_to_lower_index():
    lin = nn.Linear(6, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1., -5., 2., -2., 0., 3.],
                                       [1., 1., 1., 1., 1., 1.],
                                       [0., 0., -7., 0., 7., 0.]]))
    m = psn_masks(lin, k=2)["weight"]
    assert m.tolist() == [[False, True, False, False, False, True],
                          [True, True, False, False, False, False],
                          [False, False, True, False, True, False]]
    assert mask_indices(m).tolist() == [[1, 5], [0, 1], [2, 4]]
    assert mask_indices(m).dtype == torch.int32


def test_fused_qkv_is_per_output_row():
    """A fused qkv Linear(d, 3d) gets, row by row, exactly the masks of separate q/k/v Linears."""
    torch.manual_seed(1)
    qkv = nn.Linear(8, 24)
    parts = [nn.Linear(8, 8) for _ in range(3)]
    with torch.no_grad():
        for i, part in enumerate(parts):
            part.weight.copy_(qkv.weight[8 * i:8 * (i + 1)])
    fused = psn_masks(qkv, k=3)["weight"]
    separate = torch.cat([psn_masks(p, k=3)["weight"] for p in parts])
    assert torch.equal(fused, separate)


def test_k_at_least_fan_in_keeps_everything(toy):
    m = psn_masks(toy, k=1000)
    for n, mask in m.items():
        if m.rules[n] == "sparse":
            assert mask.all()


def test_k_zero_freezes_sparsified_weights(toy):
    m = psn_masks(toy, k=0)
    assert all(not m[n].any() for n in m if m.rules[n] == "sparse")
    trainable = sum(p.numel() for n, p in toy.named_parameters() if m.rules[n] == "trainable")
    assert m.kept == trainable


def test_include_exclude_frozen_and_switches(toy):
    m = psn_masks(toy, k=2, exclude=[r"^fc1\."], include=r"^emb\.weight$",
                  frozen=lambda name, owner: isinstance(owner, nn.Conv1d))
    assert m.rules["fc1.weight"] == "trainable" and m["fc1.weight"] is None
    assert m.rules["emb.weight"] == "sparse"
    assert torch.equal(row_counts(m["emb.weight"]), torch.full((10,), 2))
    assert m.rules["conv1d.weight"] == m.rules["conv1d.bias"] == "frozen"
    assert m.rules["pos_embed"] == "trainable"        # frozen= replaced the default patterns
    m = psn_masks(toy, k=2, types=(nn.Linear,), freeze_norm=False, train_bias=False,
                  other="frozen")
    assert m.rules["conv.weight"] == "frozen"          # no longer a sparsified type: other
    assert m.rules["fc1.weight"] == "sparse"
    assert m.rules["ln.weight"] == "trainable" and m.rules["bn.bias"] == "trainable"
    assert m.rules["fc1.bias"] == "frozen" and m.rules["gamma"] == "frozen"
    # exclude wins over include, include over the frozen patterns
    m = psn_masks(toy, k=2, include=["pos_embed", "fc2"], exclude="fc2")
    assert m.rules["pos_embed"] == "sparse" and m.rules["fc2.weight"] == "trainable"


def test_shared_parameters_count_once():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    m = psn_masks(model, k=2)
    assert list(m) == ["0.weight", "0.bias"]
    assert m.denominator == 20 and m.kept == 8 + 4


def test_report_and_summary(toy):
    m = psn_masks(toy, k=4)
    r = m.report()
    params = dict(toy.named_parameters())
    assert [x.name for x in r["layers"]] == list(params)
    for x in r["layers"]:
        assert x.total == params[x.name].numel() and x.shape == tuple(params[x.name].shape)
        expect = {"trainable": x.total, "frozen": 0}.get(x.rule)
        if expect is None:
            expect = int(m[x.name].sum())
            assert x.k == min(4, params[x.name][0].numel())
        assert x.kept == expect and math.isclose(x.fraction, x.kept / x.total)
    assert r["kept"] == sum(x.kept for x in r["layers"])
    assert r["total"] == sum(p.numel() for p in toy.parameters())
    assert math.isclose(r["fraction"], r["kept"] / r["total"]) and r["fraction"] == m.fraction
    text = m.summary()
    assert "conv.weight" in text and "total:" in text and "all parameters" in text
    assert "more" in m.summary(max_rows=3)


def test_denominators(toy):
    all_ = psn_masks(toy, k=3)
    sp = psn_masks(toy, k=3, denominator="sparse")
    n_sparse = sum(p.numel() for n, p in toy.named_parameters() if all_.rules[n] == "sparse")
    kept_sparse = sum(int(all_[n].sum()) for n in all_ if all_.rules[n] == "sparse")
    assert sp.denominator == n_sparse and sp.kept == kept_sparse
    given = psn_masks(toy, k=3, denominator=10 ** 6)
    assert given.kept == all_.kept and math.isclose(given.fraction, all_.kept / 1e6)
    with pytest.raises(ValueError, match="denominator"):
        psn_masks(toy, k=3, denominator="encoder")


@pytest.mark.parametrize("target", [0.0, 0.05, 0.2, 0.37, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("denominator", ["all", "sparse"])
def test_fraction_finds_the_nearest_k(toy, target, denominator):
    m = psn_masks(toy, fraction=target, denominator=denominator)
    max_f = max(p[0].numel() for n, p in toy.named_parameters() if m.rules[n] == "sparse")
    fracs = [psn_masks(toy, k=kk, denominator=denominator).fraction for kk in range(max_f + 1)]
    best = min(abs(f - target) for f in fracs)
    assert abs(m.fraction - target) == pytest.approx(best, abs=1e-12)
    assert m.target_fraction == target and m.fraction == fracs[m.k]


def test_argument_errors(toy):
    with pytest.raises(ValueError, match="exactly one"):
        psn_masks(toy)
    with pytest.raises(ValueError, match="exactly one"):
        psn_masks(toy, k=3, fraction=0.3)
    with pytest.raises(ValueError, match="method"):
        psn_masks(toy, k=3, method="magnitude")
    with pytest.raises(ValueError, match="k must"):
        psn_masks(toy, k=-1)
    with pytest.raises(ValueError, match="fraction"):
        psn_masks(toy, fraction=1.5)
    with pytest.raises(TypeError, match="exclude"):
        psn_masks(toy, k=3, exclude=[3])


def test_random_method(toy):
    psn = psn_masks(toy, k=4)
    a = psn_masks(toy, k=4, method="random", generator=torch.Generator().manual_seed(0))
    b = psn_masks(toy, k=4, method="random", generator=torch.Generator().manual_seed(0))
    c = psn_masks(toy, k=4, method="random", generator=torch.Generator().manual_seed(1))
    assert a.kept == psn.kept and a.rules == psn.rules
    differs = False
    for n in psn:
        if psn.rules[n] != "sparse":
            assert (a[n] is None) == (psn[n] is None)
            continue
        assert torch.equal(row_counts(a[n]), row_counts(psn[n]))
        assert torch.equal(a[n], b[n])
        differs |= not torch.equal(a[n], c[n]) or not torch.equal(a[n], psn[n])
    assert differs


def test_random_positions_are_uniform():
    lin = nn.Linear(10, 2000, bias=False)
    m = psn_masks(lin, k=3, method="random", generator=torch.Generator().manual_seed(0))["weight"]
    per_col = m.float().mean(0)                  # each column is kept with probability 3/10
    assert torch.allclose(per_col, torch.full((10,), 0.3), atol=0.05)


def test_global_method(toy):
    psn = psn_masks(toy, k=4)
    g = psn_masks(toy, k=4, method="global")
    params = dict(toy.named_parameters())
    names = [n for n in g if g.rules[n] == "sparse"]
    assert sum(int(g[n].sum()) for n in names) == sum(int(psn[n].sum()) for n in names)
    sel = torch.cat([params[n].detach().abs().flatten()[g[n].flatten()] for n in names])
    rest = torch.cat([params[n].detach().abs().flatten()[~g[n].flatten()] for n in names])
    assert sel.min() >= rest.max()
    # not per row: some rows get more than K, some fewer
    counts = torch.cat([row_counts(g[n]) for n in names if params[n][0].numel() > 4])
    assert counts.max() > 4 and counts.min() < 4


def test_global_ties_take_the_earlier_entries():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    m = psn_masks(lin, k=1, method="global")["weight"]
    assert m.flatten().tolist() == [True, True, False, False, False, False, False, False]


def test_reverse_method(toy):
    r = psn_masks(toy, k=4, method="reverse")
    params = dict(toy.named_parameters())
    for n in r:
        if r.rules[n] != "sparse":
            continue
        W = params[n].detach().reshape(params[n].shape[0], -1).abs()
        mask = r[n].reshape(W.shape)
        assert torch.equal(mask.sum(1), torch.full((W.shape[0],), min(4, W.shape[1])))
        if W.shape[1] > 4:
            big = torch.where(mask, W, torch.zeros_like(W)).max(1).values
            small = torch.where(~mask, W, torch.full_like(W, float("inf"))).min(1).values
            assert (big <= small).all()


def test_for_params(toy):
    m = psn_masks(toy, k=3)
    fp = m.for_params(toy)
    params = dict(toy.named_parameters())
    assert set(map(id, fp)) == {id(params[n]) for n in m if m[n] is not None}
    assert all(fp[params[n]] is m[n] for n in m if m[n] is not None)
    full = m.for_params(toy, include_trainable=True)
    assert len(full) == len(params) and full[params["fc1.bias"]] is None
    with pytest.raises(KeyError):
        m.for_params(nn.Linear(2, 2))


def test_masks_live_on_the_parameter_device_and_to(toy):
    m = psn_masks(toy, k=3)
    assert all(x.device.type == "cpu" for x in m.values() if x is not None)
    m2 = m.to("cpu")
    assert isinstance(m2, SparseMasks) and m2.fraction == m.fraction and m2.k == m.k


def test_topk_goes_through_one_indirection(toy, monkeypatch):
    calls = []

    def fake(W, k):
        calls.append(tuple(W.shape))
        return topk_mask_reference(W, k)

    monkeypatch.setattr(sparse, "_topk_mask", fake)
    psn_masks(toy, k=3)
    assert len(calls) == sum(1 for r in psn_masks(toy, k=3).rules.values() if r == "sparse")


# --- timm models (random init, no download) ---------------------------------------------------
@pytest.fixture(scope="module")
def vit_b():
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)


@needs_timm
def test_vit_b_k300_matches_the_paper(vit_b):
    """The paper's Tab. 4: 29.38% trainable for ViT (k = 300). Denominator: all parameters of the
    encoder (timm's ViT-B/16 without head, 85,798,656); biases trained, norms / pos_embed /
    cls_token frozen; fused qkv per output row."""
    m = psn_masks(vit_b, k=300)
    assert m.denominator == 85_798_656
    assert m.kept == 25_197_312
    assert abs(m.fraction - 0.2938) < 0.005
    r = {x.name: x for x in m.report()["layers"]}
    assert r["blocks.0.attn.qkv.weight"].k == 300 and r["blocks.0.mlp.fc2.weight"].k == 300
    assert r["blocks.0.mlp.fc2.weight"].fraction == pytest.approx(300 / 3072)
    assert r["pos_embed"].rule == r["cls_token"].rule == r["norm.weight"].rule == "frozen"
    assert r["blocks.3.attn.qkv.bias"].rule == "trainable"


@needs_timm
def test_vit_b_fraction(vit_b):
    m = psn_masks(vit_b, fraction=0.3)
    assert abs(m.fraction - 0.3) <= 0.01
    rep = m.report()
    assert rep["fraction"] == m.fraction and len(rep["layers"]) == len(list(vit_b.parameters()))
    qkv = next(x for x in rep["layers"] if x.name == "blocks.0.attn.qkv.weight")
    assert qkv.fraction == pytest.approx(min(m.k, 768) / 768)
    assert f"{m.fraction:.4f}" in m.summary()


@needs_timm
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "resnet18", "convnext_tiny"])
def test_timm_models(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    m = psn_masks(model, fraction=0.3)
    assert abs(m.fraction - 0.3) <= 0.01, m.summary()
    rules = m.rules
    params = dict(model.named_parameters())
    assert set(rules) == set(params)
    for n, mask in m.items():
        p = params[n]
        if rules[n] == "sparse":
            F = p[0].numel()
            assert torch.equal(row_counts(mask), torch.full((p.shape[0],), min(m.k, F)))
    if name.startswith("swin"):
        tables = [n for n in rules if n.endswith("relative_position_bias_table")]
        assert tables and all(rules[n] == "frozen" for n in tables)
        assert rules["layers.0.blocks.0.attn.qkv.weight"] == "sparse"
    if name == "resnet18":
        assert rules["bn1.weight"] == rules["layer1.0.bn1.bias"] == "frozen"
        assert rules["conv1.weight"] == "sparse"
    if name == "convnext_tiny":
        assert rules["stages.0.blocks.0.gamma"] == "trainable"     # layer scale: "other"
        assert rules["stages.0.blocks.0.norm.weight"] == "frozen"
        dw = m["stages.0.blocks.0.conv_dw.weight"]                   # F = 49 <= k: all kept
        assert dw.all()
