"""FairGrad (Ban & Ji, ICML 2024): alpha-fair weights G w = w^(-1/alpha), checked against
TorchJD's FairGradWeighting (scipy's least_squares, the authors' and LibMTL's solver)."""
import math

import pytest
import torch

import gradops.weighting as W
from gradops.weighting import get_method
from gradops.weighting._fairgrad import fairgrad

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
pytest.importorskip("scipy")

J3 = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, -1.0], [0.0, -1.0, 1.0]], dtype=torch.float64)


def _J(T, P, seed):
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_declaration_and_option_errors():
    cls = get_method("FairGrad")
    assert cls is W.FairGrad and cls.kind == "gram" and cls.iterative
    assert not cls.scale_invariant
    for opt, bad, msg in [("alpha", -0.5, "'alpha' must be >= 0"),
                          ("max_iter", -1, "'max_iter' must be >= 0"),
                          ("tol", -1.0, "'tol' must be >= 0"),
                          ("alpha", "x", "'alpha' must be float")]:
        with pytest.raises(ValueError, match=msg):
            cls(**{opt: bad})
    with pytest.raises(ValueError, match="alpha must be a float >= 0"):
        fairgrad(J3 @ J3.T, alpha=-1.0)


def test_pinned_values():
    """Computed once by this implementation after it agreed with TorchJD (below) to 1e-8."""
    G = J3 @ J3.T
    pinned = {0.5: [0.5699939192, 1.8384373573, 1.4928111122],
              1.0: [0.3610221246, 2.5345177169, 2.3832896476],
              2.0: [0.1281432488, 3.8097998030, 3.9337528522]}
    for alpha, expect in pinned.items():
        w, st = fairgrad(G, alpha, return_status=True)
        torch.testing.assert_close(w, torch.tensor(expect, dtype=torch.float64), atol=1e-9,
                                   rtol=0)
        assert bool(st.converged) and float(st.residual) <= 1e-8
        # the defining equation, g_i . d = w_i^(-1/alpha)
        torch.testing.assert_close(G @ w, w ** (-1.0 / alpha), atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("T,P,alpha", [(2, 5, 0.1), (3, 8, 0.5), (3, 8, 1.0), (4, 12, 2.0),
                                       (5, 12, 5.0), (5, 20, 1.5)])
def test_agrees_with_torchjd(T, P, alpha):
    """TorchJD 0.18's FairGradWeighting (least_squares from 1/T on the host, the authors'
    code) finds the same root; float64 and float32 Grams."""
    G = _J(T, P, T + 10 * P) @ _J(T, P, T + 10 * P).T
    ref = torchjd_aggregation.FairGradWeighting(alpha)(G)
    w, st = fairgrad(G, alpha, return_status=True)
    assert bool(st.converged)
    assert float((w - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    w32 = fairgrad(G.float(), alpha)
    assert w32.dtype == torch.float32
    torch.testing.assert_close(w32.double(), ref, rtol=1e-5, atol=1e-6)
    agg = W.FairGrad(alpha=alpha).torchjd(T)
    assert type(agg).__name__ == "FairGrad" and agg.alpha == alpha


def test_alpha_one_is_nash_mtl_and_alpha_zero_the_mean():
    G = _J(4, 9, 3) @ _J(4, 9, 3).T
    torch.testing.assert_close(fairgrad(G, 1.0), W.nashmtl(G, max_norm=0.0, tol=1e-10),
                               rtol=1e-7,
                               atol=1e-8)
    w, st = fairgrad(G, 0.0, return_status=True)
    torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(w, torchjd_aggregation.FairGradWeighting(0.0)(G))
    assert bool(st.converged)


def test_scaling_rule():
    """J -> sJ: w -> s^(-2 alpha / (1 + alpha)) w."""
    G = _J(3, 7, 5) @ _J(3, 7, 5).T
    for alpha in (0.5, 2.0):
        torch.testing.assert_close(fairgrad(9.0 * G, alpha),
                                   fairgrad(G, alpha) * 3.0 ** (-2 * alpha / (1 + alpha)),
                                   rtol=1e-7, atol=0)


def test_zero_gradient_task_gets_zero_weight():
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    w, st = fairgrad(J @ J.T, 2.0, return_status=True)
    assert float(w[1]) == 0.0 and bool(st.converged)
    ref = fairgrad((J @ J.T)[[0, 2]][:, [0, 2]], 2.0)
    torch.testing.assert_close(w[[0, 2]], ref)


def test_no_solution_says_not_converged():
    """Opposite gradients: 0 is in the hull, no positive root; the status says so."""
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    w, st = fairgrad(J @ J.T, 1.0, max_iter=30, return_status=True)
    assert not bool(st.converged) and int(st.iterations) == 30 and float(st.residual) > 0.5


def test_nonfinite_gram_gives_nan():
    G = torch.eye(3)
    G[1, 1] = math.nan
    w, st = fairgrad(G, 2.0, return_status=True)
    assert torch.isnan(w).all() and not bool(st.converged) and math.isnan(float(st.residual))


def test_fixed_budget_matches_early_exit():
    G = _J(4, 9, 8) @ _J(4, 9, 8).T
    a = fairgrad(G, 0.7, early_exit=True)
    b = fairgrad(G, 0.7, early_exit=False)
    assert torch.equal(a, b)
