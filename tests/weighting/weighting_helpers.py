"""Inputs and checks shared by the weighting tests (tests/weighting/test_<method>.py and
test_common.py): task gradients of mixed scales, degenerate Jacobians, the update ``d = w^T J``
and its distance to a reference at the problem's scale, the tight solver budgets (the
``solver_backend`` fixture is in tests/weighting/conftest.py)."""
from __future__ import annotations

import numpy as np
import torch

import gradops
from gradops import weighting as W

TS = (1, 2, 3, 5, 8, 40)
P = 64


def make_jac(T: int, P: int = P, seed: int = 0, common: float = 0.5) -> torch.Tensor:
    """Task gradients with different scales (0.1..3) and a shared component (some conflict,
    mostly positive correlation, like real task gradients), fp64."""
    g = torch.Generator().manual_seed(1000 * T + seed)
    Z = torch.randn(T, P, generator=g, dtype=torch.float64)
    Z = Z + common * torch.randn(1, P, generator=g, dtype=torch.float64)
    scales = 0.1 + 2.9 * torch.rand(T, 1, generator=g, dtype=torch.float64)
    return Z * scales


def degenerate_jacs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    B = torch.randn(3, 30, generator=g, dtype=torch.float64)
    out = {}
    out["rank3_of_5_positive"] = torch.rand(5, 3, generator=g, dtype=torch.float64) @ B
    out["rank2_of_5_mixed"] = torch.randn(5, 2, generator=g, dtype=torch.float64) @ B[:2]
    J = torch.randn(4, 30, generator=g, dtype=torch.float64)
    J[2] = J[0]
    out["duplicate_rows"] = J
    J = torch.randn(4, 30, generator=g, dtype=torch.float64)
    J[1] = 0.0
    out["zero_row"] = J
    out["T1"] = torch.randn(1, 30, generator=g, dtype=torch.float64)
    out["T40_P10"] = torch.randn(40, 10, generator=g, dtype=torch.float64)
    J = torch.randn(3, 30, generator=g, dtype=torch.float64)
    J[1] = -J[0]
    out["opposite_pair"] = J
    out["all_zero"] = torch.zeros(3, 10, dtype=torch.float64)
    return out


DEGENERATE = degenerate_jacs()


def gram(J: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    X = J.to(dtype)
    return X @ X.T


def update(w: torch.Tensor, J: torch.Tensor) -> np.ndarray:
    return (w.double() @ J.double()).numpy()


def max_norm_of(J: torch.Tensor) -> float:
    return max(float(J.norm(dim=1).max()), 1e-300)


def assert_update_close(d: np.ndarray, ref: np.ndarray, J: torch.Tensor, rel: float, what=""):
    """``||d - ref|| <= rel * max_i ||g_i||`` (scale of the problem, meaningful when ref ~ 0)."""
    err = float(np.linalg.norm(d - ref)) / max_norm_of(J)
    assert err <= rel, f"{what}: ||d - ref|| / max ||g_i|| = {err:.3g} > {rel:.3g}"


TIGHT = {"mgda": dict(max_iter=1500, tol=1e-12), "cagrad": dict(max_iter=1000, tol=1e-12),
         "nashmtl": dict(max_iter=40, tol=1e-12)}


def _call(method, G, **kw):
    kw = {**TIGHT.get(method, {}), **kw}
    with gradops.use_backend("torch"):
        return W.get(method)(G, **kw)
