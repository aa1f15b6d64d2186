"""DualProj (TorchJD): the Gram-form solver against a vector-form oracle and against TorchJD's
``DualProj`` aggregator.

TorchJD's default projector needs ``qpsolvers`` + ``quadprog`` (not installed here): TorchJD's
aggregator runs with a test projector (TorchJD's normalise + regularise, then the QP of
Quinton & Rey's Proposition 1 by scipy's NNLS). The vector-form oracle is GEM's projection
(Lopez-Paz & Ranzato, NeurIPS 2017, Eq. 11; Quinton & Rey's Eq. 3) of the mean gradient in the
parameter space: ``pi_J(g) = g + J^T mu``, ``mu = argmin_{mu >= 0} ||g + J^T mu||^2`` (Moreau's
decomposition, scipy's NNLS), in the space ``[J / ||J||_F, sqrt(reg_eps) I]`` whose Gram is
TorchJD's regularised one.
"""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from backend_lists import cpu_backends
from dual_cone_checks import check_backend_choice, check_cpp_matches_torch

from gradops.weighting import StepContext, get_method
from gradops.weighting._dualproj import DualProj, dualproj

J3 = torch.tensor([[1.0, 0.0, 2.0, -1.0], [-1.0, 1.0, 0.0, 0.5], [0.5, -2.0, 1.0, 0.0]],
                  dtype=torch.float64)


def oracle_dualproj(J: np.ndarray, reg_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(d, w)``: the mean gradient projected onto ``{x : J x >= 0}`` (GEM's Eq. 11)."""
    T, P = J.shape
    s = np.sqrt(reg_eps * np.sum(J * J))
    Ja = np.concatenate([J, s * np.eye(T)], 1) if reg_eps > 0 else J
    g = Ja.mean(0)
    mu, _ = nnls(Ja.T, -g, maxiter=10_000)
    x = g + Ja.T @ mu
    w = x[P:] / s if reg_eps > 0 else np.linalg.lstsq(J.T, x, rcond=None)[0]
    return x[:P], w


def _J(T: int, P: int, seed: int) -> torch.Tensor:
    J = torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    J[1:] -= 0.7 * J[0]
    return J


def test_declaration_and_option_errors():
    assert get_method("dual_proj") is DualProj and DualProj.kind == "gram" and DualProj.iterative
    with pytest.raises(ValueError, match="option 'reg_eps' must be >= 0"):
        DualProj(reg_eps=-0.5)
    with pytest.raises(ValueError, match="option 'max_iter' must be >= 0"):
        DualProj(max_iter=-3)
    with pytest.raises(ValueError, match="option 'tol' must be >= 0"):
        DualProj(tol=float("nan"))


@pytest.mark.parametrize("reg_eps", [1e-4, 0.0])
@pytest.mark.parametrize("T,P", [(2, 9), (3, 5), (5, 40), (8, 12)])
def test_agrees_with_the_vector_form_oracle(T, P, reg_eps, solver_backend):
    worst = 0.0
    for seed in range(4):
        J = _J(T, P, seed)
        w, status = dualproj(J @ J.T, reg_eps=reg_eps, return_status=True)
        d_ref, w_ref = oracle_dualproj(J.numpy(), reg_eps)
        assert bool(status.converged) and float(status.residual) < 1e-12
        worst = max(worst, float(np.abs(w.numpy() - w_ref).max()),
                    float(np.abs((w @ J).numpy() - d_ref).max()))
    assert worst < 1e-9, worst          # measured (all cases): 4.6e-13 on w, 8.9e-14 on d


def test_agrees_with_torchjds_dualproj_aggregator():
    pytest.importorskip("torchjd")
    from torchjd._linalg import normalize, regularize   # QuadprogProjector's own steps
    from torchjd.aggregation import DualProj as TorchJDDualProj
    from torchjd.linalg import DualConeProjector

    class NNLSProjector(DualConeProjector):
        def __call__(self, U, G):
            H = regularize(normalize(G, 1e-4), 1e-4).double().numpy()
            Lt = np.linalg.cholesky(H).T
            rows = [u + nnls(Lt, -Lt @ u, maxiter=10_000)[0]
                    for u in U.double().numpy().reshape(-1, H.shape[0])]
            return torch.tensor(np.stack(rows), dtype=U.dtype).reshape(U.shape)

    agg = TorchJDDualProj(projector=NNLSProjector())
    worst = 0.0
    for T, P, seed in [(2, 7, 0), (3, 4, 1), (5, 30, 2), (8, 16, 3)]:
        J = _J(T, P, seed)
        w = DualProj().weights(J @ J.T, StepContext(dtype=torch.float64))[0]
        worst = max(worst, float((w @ J - agg(J)).abs().max()))
    assert worst < 1e-9, worst          # measured: 1.2e-14


def test_pinned_values():
    """Computed once by :func:`dualproj` after it agreed with the oracle (reg_eps = 0: exact
    fractions 1/3, 16/27)."""
    G = J3 @ J3.T
    w0 = dualproj(G, reg_eps=0.0)
    torch.testing.assert_close(w0, torch.tensor([1 / 3, 16 / 27, 1 / 3], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(dualproj(G), torch.tensor([1 / 3, 0.592237250242, 1 / 3],
                                                         dtype=torch.float64),
                               atol=1e-11, rtol=0)
    assert bool((J3 @ (w0 @ J3) >= -1e-12).all())


def test_mean_without_conflict_budget_and_nonfinite():
    J = torch.rand(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(dualproj(J @ J.T), torch.full((4,), 0.25, dtype=torch.float64))
    J = _J(8, 12, 1)
    _, st = dualproj(J @ J.T, max_iter=1, return_status=True)
    assert not bool(st.converged)
    G = J3 @ J3.T
    G[2, 2] = float("inf")
    w, st = dualproj(G, return_status=True)
    assert not torch.isfinite(w).any() and not bool(st.converged)


# ----------------------------------------------------------------------------------------- #
# the C++ dual-cone solver (_C.dual_cone_cpu) against the torch reference loop
# ----------------------------------------------------------------------------------------- #
@pytest.mark.skipif("cpp" not in cpu_backends(), reason="gradops._C not built (GRADOPS_NO_EXT=1)")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reg_eps", [1e-4, 0.0])
@pytest.mark.parametrize("T", [2, 3, 4, 5, 8, 13, 21, 40])
def test_cpp_solver_matches_the_torch_loop(T, reg_eps, dtype):
    """The C++ solver against the torch loop (:func:`dual_cone_checks.check_cpp_matches_torch`):
    the same iterations and convergence, weights equal to rounding, NaN in, NaN out."""
    check_cpp_matches_torch(dualproj, T, reg_eps, dtype)


def test_cpp_solver_backend_choice():
    """A forced C++ backend for a G that requires grad raises; the automatic choice keeps the
    differentiable torch loop (:func:`dual_cone_checks.check_backend_choice`)."""
    check_backend_choice(dualproj, (J3 @ J3.T).requires_grad_())
