"""CR-MOGM (Zhou et al., NeurIPS 2022): an EMA of a base method's weights, checked step by step
against TorchJD's CRMOGMWeighting around the same base's TorchJD weighting."""
import math

import pytest
import torch

import gradops.weighting as W
from gradops.weighting import StepContext, get_method

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")

J3 = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, -1.0], [0.0, -1.0, 1.0]], dtype=torch.float64)
CTX = StepContext(dtype=torch.float64)


def _Gs(T, P, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        J = torch.randn(T, P, generator=g, dtype=torch.float64)
        out.append(J @ J.T)
    return out


def test_declaration_and_option_errors():
    cls = get_method("CR-MOGM")
    assert cls is W.CRMOGM and cls.kind == "gram" and cls.display == "CR-MOGM"
    for opts, msg in [({"alpha": 1.5}, r"'alpha' must be in \[0, 1\]"),
                      ({"base": "nope"}, "'base' must name a registered method"),
                      ({"base": "graddrop"}, "'base' must be a Gram-weighted method"),
                      ({"base": "crmogm"}, "other than crmogm")]:
        with pytest.raises(ValueError, match=msg):
            cls(**opts)
    assert cls(base="IMTL-G").base.name == "imtlg"


def test_pinned_values():
    """Computed once by this implementation after it agreed with TorchJD (below); the second
    step is 0.9 of the first MGDA weights plus 0.1 of the permuted problem's."""
    m = W.CRMOGM()
    G = J3 @ J3.T
    w1, st = m.weights(G, CTX)
    torch.testing.assert_close(w1, torch.tensor([0.0, 16 / 33, 17 / 33], dtype=torch.float64))
    assert bool(st.converged)
    w2, _ = m.weights(G[[1, 2, 0]][:, [1, 2, 0]], CTX)
    torch.testing.assert_close(w2, torch.tensor([0.0484848485, 0.4878787879, 0.4636363636],
                                                dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(w2, 0.9 * w1 + 0.1 * W.mgda(G[[1, 2, 0]][:, [1, 2, 0]]))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_agrees_with_torchjd_around_imtlg(alpha):
    """TorchJD 0.18's CRMOGMWeighting(IMTLGWeighting()) (IMTL-G is closed form in both
    libraries, so the comparison is exact), 6 steps."""
    m = W.CRMOGM(base="imtlg", alpha=alpha)
    ref = m.torchjd(4).gramian_weighting
    assert type(ref).__name__ == "CRMOGMWeighting"
    for G in _Gs(4, 10, 6, seed=0):
        torch.testing.assert_close(m.weights(G, CTX)[0], ref(G), rtol=0, atol=1e-12)


def test_agrees_with_torchjd_around_mgda():
    """Around MGDA: TorchJD's MGDAWeighting is Frank-Wolfe (here epsilon=1e-8, 5000
    iterations), exact only to about 1e-4 (1.7e-4 measured over these 6 steps; 9e-6 with
    epsilon=1e-10 at 25x the time); gradops' MGDA is an exact active-set solve."""
    m = W.CRMOGM()
    ref = torchjd_aggregation.CRMOGMWeighting(
        torchjd_aggregation.MGDAWeighting(epsilon=1e-8, max_iters=5000), alpha=0.9)
    for G in _Gs(4, 10, 6, seed=0):
        torch.testing.assert_close(m.weights(G, CTX)[0], ref(G), rtol=0, atol=5e-4)


def test_nonfinite_step_and_state_round_trip():
    m = W.CRMOGM(base="imtlg", alpha=0.5)
    Gs = _Gs(3, 6, 3, seed=1)
    m.weights(Gs[0], CTX)
    saved = m.state_dict()
    bad = Gs[1].clone()
    bad[0, 0] = math.nan
    w, _ = m.weights(bad, CTX)
    assert not torch.isfinite(w).any()
    assert torch.equal(m.lam, saved["crmogm_lambda"])
    n = W.CRMOGM(base="imtlg", alpha=0.5)
    n.load_state_dict(saved)
    assert torch.equal(n.weights(Gs[2], CTX)[0], m.weights(Gs[2], CTX)[0])
    # a first step with a NaN Gram leaves the state unset: the next step starts afresh
    f = W.CRMOGM(base="imtlg", alpha=0.5)
    f.weights(bad, CTX)
    torch.testing.assert_close(f.weights(Gs[2], CTX)[0], W.imtlg(Gs[2]))
