"""The C++ dual-cone solver (``_C.dual_cone_cpu``) against the torch reference loop: the checks
UPGrad's and DualProj's tests run, each with its own function of the Gram."""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

import gradops
from backend_lists import cpu_backends


def grams(T: int, seed: int) -> dict[str, torch.Tensor]:
    """Conflicting, rank-deficient (rank ``T // 2 + 1``, duplicate row) and NaN Grams."""
    g = torch.Generator().manual_seed(1000 * T + seed)
    J = torch.randn(T, 3 * T + 4, generator=g, dtype=torch.float64)
    J = J * (0.1 + 2.9 * torch.rand(T, 1, generator=g, dtype=torch.float64))
    J[1:] -= 0.7 * J[0]
    r = T // 2 + 1
    Jr = torch.randn(T, r, generator=g, dtype=torch.float64) @ torch.randn(
        r, 2 * T, generator=g, dtype=torch.float64)
    Jr[-1] = Jr[0]
    Gn = J @ J.T
    Gn[0, T - 1] = Gn[T - 1, 0] = math.nan
    return {"conflicting": J @ J.T, "rank_deficient": Jr @ Jr.T, "nan": Gn}


def check_cpp_matches_torch(fn: Callable, T: int, reg_eps: float, dtype: torch.dtype) -> None:
    """Same method step for step in float64: the same iterations and convergence, weights
    equal to rounding (float64 G), to float32 rounding of the result (float32 G) (rank-deficient
    G without ridge: the update ``J^T v``, relative to ``||J||_F``, as ``v`` is not unique);
    NaN in, NaN weights and a NaN residual out."""
    worst_w = worst_d = 0.0
    for seed in range(6):
        for kind, G in grams(T, seed).items():
            G = G.to(dtype)
            with gradops.use_backend("torch"):
                w0, s0 = fn(G, reg_eps=reg_eps, return_status=True)
            with gradops.use_backend("cpp"):
                w1, s1 = fn(G, reg_eps=reg_eps, return_status=True)
            what = (T, reg_eps, dtype, seed, kind)
            assert w1.dtype == dtype and s1.residual.dtype == dtype, what
            assert int(s1.iterations) == int(s0.iterations), (what, s0, s1)
            assert bool(s1.converged) == bool(s0.converged), (what, s0, s1)
            if kind == "nan":
                assert torch.isnan(w1).all() and torch.isnan(s1.residual), what
                continue
            e = w1.double() - w0.double()
            if kind == "rank_deficient" and reg_eps == 0:   # v not unique, J^T v is
                Gd = G.double()
                worst_d = max(worst_d, math.sqrt(max(float(e @ Gd @ e / Gd.trace()), 0.0)))
            else:
                assert bool(s1.converged), (what, s1)
                worst_w = max(worst_w, float(e.abs().max()))
    assert worst_w < (1e-10 if dtype == torch.float64 else 1e-6), worst_w
    assert worst_d < (1e-8 if dtype == torch.float64 else 1e-3), worst_d


def check_backend_choice(fn: Callable, G: torch.Tensor) -> None:
    """A forced C++ backend for a G that requires grad raises (only the torch loop is
    differentiable); the automatic choice keeps the torch loop there (autograd runs through it)."""
    if "cpp" in cpu_backends():
        with gradops.use_backend("cpp"), pytest.raises(RuntimeError, match="requires grad"):
            fn(G)
    w = fn(G)
    with gradops.use_backend("torch"):
        assert torch.equal(w, fn(G))
    w.sum().backward()
    assert G.grad is not None
