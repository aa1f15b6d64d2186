"""gradops.metrics against brute-force computations on the vectors."""
from __future__ import annotations

import itertools

import pytest
import torch

import gradops
from gradops import metrics

from helpers import make_J


def _cos64(J):
    Jd = J.double()
    n = Jd.norm(dim=1)
    out = torch.zeros(J.shape[0], J.shape[0], dtype=torch.float64)
    for i, j in itertools.product(range(J.shape[0]), repeat=2):
        if n[i] > 0 and n[j] > 0:
            out[i, j] = Jd[i] @ Jd[j] / (n[i] * n[j])
    return out


@pytest.mark.parametrize("T", [1, 2, 3, 7, 40])
def test_cosine_gms_incidence_counts(T):
    J = make_J(T, 301, seed=T)
    if T > 2:
        J[1] = 0  # a zero-norm row: cosine 0, no NaN
    G = gradops.gram(J)
    cos = metrics.cosine(G)
    ref = _cos64(J)
    assert not torch.isnan(cos).any()
    assert torch.allclose(cos.double(), ref, atol=1e-5)
    n = J.double().norm(dim=1)
    gms_ref = torch.zeros(T, T, dtype=torch.float64)
    for i, j in itertools.product(range(T), repeat=2):
        d = n[i] ** 2 + n[j] ** 2
        gms_ref[i, j] = 0.0 if d == 0 else 2 * n[i] * n[j] / d
    assert torch.allclose(metrics.gms(G).double(), gms_ref, atol=1e-5)
    pairs = [(i, j) for i in range(T) for j in range(i + 1, T)]
    for S in (0.0, -0.1, -0.5, 0.3):
        expected = sum(1 for i, j in pairs if ref[i, j] < S)
        assert metrics.conflict_counts(G, S).item() == expected
    expected_inc = sum(1 for i, j in pairs if ref[i, j] < 0) / max(len(pairs), 1)
    assert metrics.conflict_incidence(G).item() == pytest.approx(expected_inc)


def test_batched_over_segments():
    J = make_J(5, 1000, seed=1)
    offsets = torch.tensor([0, 10, 10, 500, 1000])
    Gl = gradops.segment_gram(J, offsets)
    counts = metrics.conflict_counts(Gl, -0.02)
    assert counts.shape == (4,) and counts.dtype == torch.int64
    for l in range(4):
        assert counts[l] == metrics.conflict_counts(Gl[l], -0.02)
    assert counts[1] == 0  # empty segment: zero Gram, no conflicts
    assert metrics.conflict_incidence(Gl).shape == (4,)
    assert metrics.cosine(Gl).shape == (4, 5, 5)
    assert metrics.gms(Gl)[1].eq(0).all()


def test_known_geometry():
    # e1, -e1, e2: pair (0,1) conflicts (cos -1), others orthogonal
    J = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0]])
    G = gradops.gram(J)
    assert metrics.cosine(G)[0, 1].item() == pytest.approx(-1.0)
    assert metrics.conflict_incidence(G).item() == pytest.approx(1 / 3)
    assert metrics.conflict_counts(G, -0.5).item() == 1
    assert metrics.gms(G)[0, 1].item() == pytest.approx(2 * 1 * 2 / (1 + 4))
    assert metrics.conflict_incidence(gradops.gram(J[:1])).item() == 0.0  # T = 1: no pairs


def test_nonfinite_propagates_not_zeroed():
    G = torch.eye(3)
    G[0, 1] = G[1, 0] = float("nan")
    assert torch.isnan(metrics.cosine(G)[0, 1])
    G2 = torch.eye(2)
    G2[0, 0] = float("inf")
    assert not torch.isfinite(metrics.cosine(G2)).all() or torch.isnan(metrics.gms(G2)).any()


def test_sign_conflict_ratio():
    J = torch.tensor([[1.0, -1.0, 0.0, 2.0], [1.0, 1.0, 5.0, -3.0]])
    res = gradops.gram(J, return_sign_counts=True)
    ratio = metrics.sign_conflict_ratio(res.opposite, res.both_nonzero)
    assert ratio[0, 1].item() == pytest.approx(2 / 3)
    assert ratio[0, 0].item() == 0.0
    zero = metrics.sign_conflict_ratio(torch.zeros(2, 2, dtype=torch.long),
                                       torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(zero, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="same shape"):
        metrics.sign_conflict_ratio(torch.zeros(2, 2), torch.zeros(3, 3))


@pytest.mark.parametrize("seed", range(5))
def test_conflict_counts_at_zero_use_the_sign_of_G(seed):
    """S = 0 counts G_ij < 0 directly; it must agree with the cosine form (zero rows, tiny and
    huge scales, NaN rows, batches)."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(4, 6, 50, generator=g)
    J[0, 2] = 0
    J[1] *= 1e-18
    J[2] *= 1e18
    G = J @ J.transpose(-1, -2)
    G[3, 1, :] = float("nan")
    G[3, :, 1] = float("nan")
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    by_cos = ((metrics.cosine(G) < 0) & mask).sum((-2, -1))
    assert torch.equal(metrics.conflict_counts(G, 0.0), by_cos)
    assert torch.equal(metrics.conflict_incidence(G), by_cos.float() / 15)
