"""PCGrad (Yu et al., NeurIPS 2020) as a weighting, ``gradops.weighting.pcgrad``: equal to the op
``gradops.pcgrad_weights`` and to the vector form of gradops.reference; the TorchJD 0.18
cross-check for two tasks. The op itself is tested in tests/ops/test_pcgrad_weights.py."""
from __future__ import annotations

import pytest
import torch

import gradops
from gradops import weighting as W

from weighting_helpers import TS, assert_update_close, gram, make_jac, update


# ----------------------------------------------------------------------------------------- #
# against the vector-form references, random Jacobians
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pcgrad_matches_vector_form(T, reduction):
    from gradops.reference import pcgrad_reference
    J = make_jac(T)
    perms = gradops.random_orders(T, generator=torch.Generator().manual_seed(T))
    with gradops.use_backend("torch"):
        w = W.pcgrad(gram(J), perms=perms, reduction=reduction)
        torch.testing.assert_close(w, gradops.pcgrad_weights(gram(J), perms=perms,
                                                             reduction=reduction))
    ref = pcgrad_reference(J, perms, reduction).numpy()
    assert_update_close(update(w, J), ref, J, 1e-4)


# ----------------------------------------------------------------------------------------- #
# TorchJD 0.18 cross-checks (their weightings take the Gramian)
# ----------------------------------------------------------------------------------------- #

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")


def test_torchjd_pcgrad_two_tasks():
    """T = 2 has one order; TorchJD's PCGrad (sum) must agree exactly."""
    J = make_jac(2)
    J[1] = -J[0] + 0.3 * J[1]
    G = gram(J)
    with gradops.use_backend("torch"):
        ours = W.pcgrad(G)
    torch.testing.assert_close(ours.double(), torchjd_aggregation.PCGradWeighting()(G),
                               rtol=1e-5, atol=1e-6)
