"""Aligned-MTL (Senushkin et al., CVPR 2023), ``gradops.weighting.alignedmtl``: the update
against the SVD form of tests/method_references.py for every scale mode, the balance
transformation's aligned gradients, degenerate Jacobians, the TorchJD 0.18 cross-check."""
from __future__ import annotations

import math

import pytest
import torch

from gradops import weighting as W

import method_references as R
from weighting_helpers import DEGENERATE, TS, assert_update_close, gram, make_jac, update


# ----------------------------------------------------------------------------------------- #
# against the vector-form references, random Jacobians
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_alignedmtl_matches_svd(T, scale_mode):
    J = make_jac(T)
    ref = R.alignedmtl_reference(J, scale_mode)
    assert_update_close(update(W.alignedmtl(gram(J), scale_mode), J), ref, J, 1e-8, "fp64")
    assert_update_close(update(W.alignedmtl(gram(J, torch.float32), scale_mode), J), ref, J,
                        1e-3, "fp32")


def test_alignedmtl_aligned_gradients():
    """The balance transformation makes B J orthonormal up to sqrt(l_min): B G B = l_min I."""
    J = make_jac(5)
    G = gram(J)
    l, V = torch.linalg.eigh(G)
    B = math.sqrt(float(l.min())) * V @ torch.diag(l.rsqrt()) @ V.T
    torch.testing.assert_close(B @ G @ B, float(l.min()) * torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(W.alignedmtl(G), B.sum(0))


# ----------------------------------------------------------------------------------------- #
# degenerate Jacobians
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", list(DEGENERATE))
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_alignedmtl_degenerate(name, scale_mode):
    J = DEGENERATE[name]
    ref = R.alignedmtl_reference(J, scale_mode)
    assert_update_close(update(W.alignedmtl(gram(J), scale_mode), J), ref, J, 1e-7, name)


# ----------------------------------------------------------------------------------------- #
# TorchJD 0.18 cross-checks (their weightings take the Gramian)
# ----------------------------------------------------------------------------------------- #

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")


@pytest.mark.parametrize("name", ["random5", "random40"] + list(DEGENERATE))
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_torchjd_alignedmtl(name, scale_mode):
    """TorchJD uses the mean preference vector: its weights are ours / T."""
    J = make_jac(5) if name == "random5" else make_jac(40) if name == "random40" \
        else DEGENERATE[name]
    G = gram(J)
    theirs = torchjd_aggregation.AlignedMTLWeighting(scale_mode=scale_mode)(G)
    ours = W.alignedmtl(G, scale_mode)
    assert_update_close(update(ours / J.shape[0], J), update(theirs, J), J, 1e-9, name)
