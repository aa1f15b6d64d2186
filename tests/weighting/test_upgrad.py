"""UPGrad (Quinton & Rey 2024): the Gram-form solver against a vector-form oracle from the paper
and against TorchJD's ``UPGrad`` aggregator.

TorchJD's default projector needs ``qpsolvers`` + ``quadprog``, which are not installed here, so
TorchJD's aggregator runs with a test projector (``_NNLSProjector``: TorchJD's own normalise +
regularise, then the QP of its Proposition 1 solved by scipy's NNLS). The vector-form oracle
follows the paper's Eq. 3 (``pi_J(x) = argmin_{y : J y >= 0} ||y - x||^2``) and Eq. 5
(``d = 1/T sum_i pi_J(g_i)``) in the parameter space: by Moreau's decomposition
``pi_J(g) = g + J^T mu``, ``mu = argmin_{mu >= 0} ||g + J^T mu||^2`` (scipy's NNLS on ``J^T``,
an exact active-set method independent of gradops' Gram-form solver). TorchJD's ``reg_eps``
is the Gram of ``[J / ||J||_F, sqrt(reg_eps) I]``: the oracle projects in that augmented space.
"""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from backend_lists import cpu_backends
from dual_cone_checks import check_backend_choice, check_cpp_matches_torch

from gradops.weighting import StepContext, get_method
from gradops.weighting._upgrad import UPGrad, upgrad

J3 = torch.tensor([[1.0, 0.0, 2.0, -1.0], [-1.0, 1.0, 0.0, 0.5], [0.5, -2.0, 1.0, 0.0]],
                  dtype=torch.float64)


def _augmented(J: np.ndarray, reg_eps: float) -> np.ndarray:
    T = J.shape[0]
    return np.concatenate([J, np.sqrt(reg_eps * np.sum(J * J)) * np.eye(T)], 1)


def project_onto_dual_cone(Ja: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Eq. 3 in the parameter space: ``x + Ja^T mu``, ``mu = argmin_{mu >= 0} ||x + Ja^T mu||``."""
    mu, _ = nnls(Ja.T, -x, maxiter=10_000)
    return x + Ja.T @ mu


def oracle_upgrad(J: np.ndarray, reg_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(d, w)``: Eq. 5 with the paper's vectors; ``w`` read off the augmented coordinates."""
    T, P = J.shape
    Ja = _augmented(J, reg_eps) if reg_eps > 0 else J
    x = sum(project_onto_dual_cone(Ja, Ja[i]) for i in range(T)) / T
    if reg_eps > 0:                      # the last T coordinates are sqrt(reg tr) w
        w = x[P:] / np.sqrt(reg_eps * np.sum(J * J))
    else:
        w = np.linalg.lstsq(J.T, x, rcond=None)[0]
    return x[:P], w


def _J(T: int, P: int, seed: int) -> torch.Tensor:
    J = torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    J[1:] -= 0.7 * J[0]                  # conflicting tasks: the projections are active
    return J


def test_declaration_and_option_errors():
    assert get_method("UPGrad") is UPGrad and UPGrad.kind == "gram" and UPGrad.iterative
    assert UPGrad.scale_invariant
    with pytest.raises(ValueError, match="option 'reg_eps' must be >= 0"):
        UPGrad(reg_eps=-1.0)
    with pytest.raises(ValueError, match="option 'max_iter' must be >= 0"):
        UPGrad(max_iter=-1)
    with pytest.raises(ValueError, match="option 'tol' must be >= 0"):
        UPGrad(tol=-1.0)
    with pytest.raises(ValueError, match="reg_eps must be a float >= 0"):
        upgrad(J3 @ J3.T, reg_eps=float("nan"))


@pytest.mark.parametrize("reg_eps", [1e-4, 0.0])
@pytest.mark.parametrize("T,P", [(2, 9), (3, 5), (5, 40), (8, 12)])
def test_agrees_with_the_vector_form_oracle(T, P, reg_eps, solver_backend):
    worst = 0.0
    for seed in range(4):
        J = _J(T, P, seed)
        w, status = upgrad(J @ J.T, reg_eps=reg_eps, return_status=True)
        d_ref, w_ref = oracle_upgrad(J.numpy(), reg_eps)
        assert bool(status.converged) and float(status.residual) < 1e-12
        worst = max(worst, float(np.abs(w.numpy() - w_ref).max()),
                    float(np.abs((w @ J).numpy() - d_ref).max()))
    assert worst < 1e-9, worst          # measured (all cases): 6.8e-13 on w, 1.6e-13 on d


class _NNLSProjector:
    """A TorchJD ``DualConeProjector``: QuadprogProjector's normalise and regularise, then
    ``min_{v >= u} v^T G v`` by NNLS on a Cholesky factor (quadprog is not installed)."""

    def __init__(self, reg_eps: float = 1e-4, norm_eps: float = 1e-4):
        self.reg_eps, self.norm_eps = reg_eps, norm_eps

    def __call__(self, U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        from torchjd._linalg import normalize, regularize   # QuadprogProjector's own steps
        G = regularize(normalize(G, self.norm_eps), self.reg_eps).double().numpy()
        Lt = np.linalg.cholesky(G).T                    # v^T G v = ||Lt v||^2
        rows = [u + nnls(Lt, -Lt @ u, maxiter=10_000)[0]
                for u in U.double().numpy().reshape(-1, G.shape[0])]
        return torch.tensor(np.stack(rows), dtype=U.dtype).reshape(U.shape)


def test_agrees_with_torchjds_upgrad_aggregator():
    pytest.importorskip("torchjd")
    from torchjd.aggregation import UPGrad as TorchJDUPGrad
    from torchjd.linalg import DualConeProjector
    proj = type("NNLSProjector", (_NNLSProjector, DualConeProjector), {})()
    agg = TorchJDUPGrad(projector=proj)
    worst = 0.0
    for T, P, seed in [(2, 7, 0), (3, 4, 1), (5, 30, 2), (8, 16, 3)]:
        J = _J(T, P, seed)
        w = UPGrad().weights(J @ J.T, StepContext(dtype=torch.float64))[0]
        worst = max(worst, float((w @ J - agg(J)).abs().max()))
    assert worst < 1e-9, worst          # measured: 3.1e-14


def test_pinned_values():
    """Computed once by :func:`upgrad` after it agreed with the oracle (reg_eps = 0: 25/27 is
    exact)."""
    G = J3 @ J3.T
    w0 = upgrad(G, reg_eps=0.0)
    torch.testing.assert_close(w0, torch.tensor([0.354785478548, 25 / 27, 0.481848184818],
                                                dtype=torch.float64), atol=1e-11, rtol=0)
    w = upgrad(G)
    torch.testing.assert_close(w, torch.tensor([0.354799298213, 0.925570583576, 0.481803426002],
                                               dtype=torch.float64), atol=1e-11, rtol=0)
    d = w0 @ J3
    assert bool((J3 @ d >= -1e-12).all())   # conflict-free: no task's loss increases


def test_non_conflicting_gradients_give_the_mean():
    J = torch.rand(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = upgrad(J @ J.T)
    torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64))


def test_float32_zero_gram_and_budget():
    G = (J3 @ J3.T).float()
    w, st = upgrad(G, return_status=True)
    assert w.dtype == torch.float32 and bool(st.converged)
    torch.testing.assert_close(w.double(), upgrad(G.double()), atol=1e-6, rtol=0)
    z, st = upgrad(torch.zeros(3, 3), return_status=True)    # zero gradients: the mean weights
    torch.testing.assert_close(z, torch.full((3,), 1 / 3))
    assert bool(st.converged)
    short, st = upgrad(J3 @ J3.T, max_iter=1, return_status=True)
    assert not bool(st.converged) and int(st.iterations) == 1 and torch.isfinite(short).all()
    full, _ = upgrad(J3 @ J3.T, max_iter=20, early_exit=False, return_status=True)
    assert torch.equal(full, upgrad(J3 @ J3.T))              # frozen once converged


def test_nonfinite_gram_gives_nan_and_not_converged():
    G = J3 @ J3.T
    G[0, 1] = float("nan")
    w, st = upgrad(G, return_status=True)
    assert torch.isnan(w).all() and not bool(st.converged)


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
    check_cpp_matches_torch(upgrad, T, reg_eps, dtype)


def test_cpp_solver_backend_choice():
    """A forced C++ backend for a G that requires grad raises; the automatic choice keeps the
    differentiable torch loop (:func:`dual_cone_checks.check_backend_choice`)."""
    check_backend_choice(upgrad, (J3 @ J3.T).requires_grad_())
