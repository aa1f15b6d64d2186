"""PCD (Priority-Constrained Descent, TMLR 2026): task 0 primary, secondaries keep a fraction tau
of their normalised progress; checked step by step against TorchJD's PCDWeighting (an exact
active-set solve on the host; ours is an interior-point solve on the device)."""
import math

import pytest
import torch

import gradops.weighting as W
from gradops.weighting import StepContext, get_method
from gradops.weighting._pcd import pcd_qp

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")

J3 = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, -1.0], [0.0, -1.0, 1.0]], dtype=torch.float64)
CTX = StepContext(dtype=torch.float64)


def test_declaration_and_option_errors():
    cls = get_method("PCD")
    assert cls is W.PCD and cls.kind == "gram" and cls.iterative and cls.scale_invariant
    assert cls.permutation_equivariant is False
    for opt, bad, msg in [("tau", 1.5, r"'tau' must be in \[0, 1\]"),
                          ("beta", 1.0, r"'beta' must be in \[0, 1\)"),
                          ("eps", -1.0, "'eps' must be >= 0"),
                          ("max_iter", -1, "'max_iter' must be >= 0"),
                          ("tol", -1.0, "'tol' must be >= 0")]:
        with pytest.raises(ValueError, match=msg):
            cls(**{opt: bad})


def test_pinned_values():
    """Computed once by this implementation after it agreed with TorchJD (below) to 1e-12."""
    m = W.PCD(tau=0.3)
    w, st = m.weights(J3 @ J3.T, CTX)
    torch.testing.assert_close(w, torch.tensor([0.5309430505, 3.0899056660, 2.8108110173],
                                               dtype=torch.float64), atol=1e-8, rtol=0)
    assert bool(st.converged) and float(st.residual) <= 1e-12
    d = w @ J3
    torch.testing.assert_close(d.norm(), J3[0].norm())              # ||d|| = ||g_1||
    torch.testing.assert_close(m.state_dict()["pcd_ema"],
                               0.001 * (J3 * J3).sum(1), rtol=1e-12, atol=0)
    assert int(m.state_dict()["pcd_count"]) == 1


@pytest.mark.parametrize("T,P,tau", [(2, 6, 0.02), (3, 8, 0.02), (4, 10, 0.3), (5, 12, 0.5),
                                     (6, 4, 0.2), (8, 20, 0.9)])
def test_agrees_with_torchjd_over_steps(T, P, tau):
    """TorchJD 0.18's PCDWeighting (Goldfarb-Idnani on the host), 6 steps of growing scale
    sharing the EMA: relative agreement 1e-10 (measured 9.7e-13). With T > P some steps have
    infeasible constraints (6 gradients in R^4): both drop them (d = g_1), ours says so."""
    g = torch.Generator().manual_seed(T * 100 + P)
    m = W.PCD(tau=tau)
    ref = m.torchjd(T).gramian_weighting
    for k in range(6):
        J = torch.randn(T, P, generator=g, dtype=torch.float64) * (1 + k)
        w, st = m.weights(J @ J.T, CTX)
        r = ref(J @ J.T)
        assert bool(st.converged) or math.isinf(float(st.residual))
        assert float((w - r).abs().max()) <= 1e-10 * float(r.abs().max())
    J = torch.randn(T, P, generator=g, dtype=torch.float64)
    w32, _ = m.weights((J @ J.T).float(), StepContext())
    assert w32.dtype == torch.float32
    torch.testing.assert_close(w32.double(), ref(J @ J.T), rtol=1e-4, atol=1e-5)


def test_special_cases_as_torchjd():
    """Infeasible constraints: d = g_1 and the status flags no solution (residual inf); a zero
    primary gradient: w = 0."""
    J = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    w, st = W.PCD(tau=0.1).weights(J @ J.T, CTX)
    torch.testing.assert_close(w, torchjd_aggregation.PCDWeighting(tau=0.1)(J @ J.T))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert not bool(st.converged) and math.isinf(float(st.residual))
    J = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 2.0, 0.0]], dtype=torch.float64)
    w, st = W.PCD().weights(J @ J.T, CTX)
    assert torch.equal(w, torch.zeros(3, dtype=torch.float64)) and bool(st.converged)
    w, st = W.PCD().weights(torch.tensor([[4.0]], dtype=torch.float64), CTX)
    torch.testing.assert_close(w, torch.ones(1, dtype=torch.float64))


def test_qp_kkt_conditions():
    """The dual solve satisfies the primal's KKT conditions: d feasible, mu >= 0,
    complementary slackness (plain vector form of the QP)."""
    g = torch.Generator().manual_seed(5)
    J = torch.randn(5, 9, generator=g, dtype=torch.float64)
    w, conv, _, _, infeasible = pcd_qp(J @ J.T, 0.4)
    assert bool(conv) and not bool(infeasible) and float(w[0]) == 1.0
    d = w @ J
    slack = J[1:] @ d - 0.4 * (J[1:] * J[1:]).sum(1)
    assert float(slack.min()) >= -1e-9 and float(w[1:].min()) >= 0
    assert float((w[1:] * slack).abs().max()) <= 1e-8


def test_nonfinite_gram_and_state():
    m = W.PCD()
    G = J3 @ J3.T
    m.weights(G, CTX)
    saved = m.state_dict()
    bad = G.clone()
    bad[1, 2] = math.nan
    w, st = m.weights(bad, CTX)
    assert torch.isnan(w).all() and not bool(st.converged) and math.isnan(float(st.residual))
    assert torch.equal(m.ema, saved["pcd_ema"]) and torch.equal(m.count, saved["pcd_count"])
    n = W.PCD()
    n.load_state_dict(saved)
    assert torch.equal(n.weights(G, CTX)[0], m.weights(G, CTX)[0])


def test_fixed_budget_matches_early_exit():
    m1, m2 = W.PCD(tau=0.3, early_exit=True), W.PCD(tau=0.3, early_exit=False)
    G = J3 @ J3.T
    assert torch.equal(m1.weights(G, CTX)[0], m2.weights(G, CTX)[0])


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_random_problems_converge_or_are_infeasible_as_torchjd(dtype, rtol):
    """60 random problems (T = 2..8, P = 3..29, mixed gradient scales, some with T > P), the
    EMA shared while T stays the same: every solve converges or is flagged infeasible (0 in the
    hull of the secondary gradients), and the weights are TorchJD's (measured: 1.5e-9 relative
    in float64, 4e-7 in float32, on 300 such problems)."""
    g = torch.Generator().manual_seed(7)
    m, ref, T_prev, infeasible = None, None, None, 0
    for _ in range(60):
        T = int(torch.randint(2, 9, (1,), generator=g))
        P = int(torch.randint(3, 30, (1,), generator=g))
        J = (torch.randn(T, P, generator=g) * torch.rand(T, 1, generator=g) * 10).to(dtype)
        if T != T_prev:
            m, ref, T_prev = W.PCD(), torchjd_aggregation.PCDWeighting(), T
        G = J @ J.T
        w, st = m.weights(G, StepContext(dtype=dtype))
        r = ref(G)
        infeasible += int(math.isinf(float(st.residual)))
        assert bool(st.converged) or math.isinf(float(st.residual))
        assert float((w - r).abs().max()) <= rtol * float(r.abs().max())
    for _ in range(5):                  # 6 secondary gradients in R^2: 0 is often in the hull
        J = torch.randn(7, 2, generator=g).to(dtype)
        w, st = W.PCD().weights(J @ J.T, StepContext(dtype=dtype))
        r = torchjd_aggregation.PCDWeighting()(J @ J.T)
        infeasible += int(math.isinf(float(st.residual)))
        assert bool(st.converged) or math.isinf(float(st.residual))
        assert float((w - r).abs().max()) <= rtol * float(r.abs().max())
    assert infeasible >= 1
