"""Matrix families for the weighting property tests (tests/weighting/test_geometries.py), in the
spirit of TorchJD's test matrices (normal, strongly / weakly stationary, rank-deficient, zero
rows, scales from 1e-10 to 1e15): each ``J [T, P]`` in float64, deterministic per seed.

``ZERO_IN_HULL`` names the families whose rows have ``0`` in their convex hull by construction
(then MGDA's update is 0 and CAGrad with ``c >= 1`` has optimal value 0)."""
from __future__ import annotations

import torch

SCALES = (1e-10, 1.0, 1e15)
"""Scales applied to every family (``J -> sJ``)."""

NC_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}
"""Relative margin of the non-conflict checks (``assert_non_conflicting``) per dtype."""

ZERO_IN_HULL = frozenset({"strong_stationary", "weak_stationary", "zero_rows"})


def _gen(T: int, P: int, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(10_000 * T + 100 * P + seed)


def normal(T: int, P: int, seed: int = 0) -> torch.Tensor:
    """i.i.d. N(0, 1) rows (for T > P: 0 is usually in the hull)."""
    return torch.randn(T, P, generator=_gen(T, P, seed), dtype=torch.float64)


def aligned(T: int, P: int, seed: int = 0) -> torch.Tensor:
    """A shared direction plus smaller noise, different norms: every pair agrees, 0 is far from
    the hull (no conflict)."""
    g = _gen(T, P, seed)
    u = torch.randn(1, P, generator=g, dtype=torch.float64)
    Z = 0.3 * torch.randn(T, P, generator=g, dtype=torch.float64) + u
    return Z * (0.2 + 3.0 * torch.rand(T, 1, generator=g, dtype=torch.float64))


def strong_stationary(T: int, P: int, seed: int = 0) -> torch.Tensor:
    """0 in the relative interior of the hull: ``a^T J = 0`` for some ``a > 0`` (the last row is
    minus a positive combination of the others)."""
    g = _gen(T, P, seed)
    J = torch.randn(T, P, generator=g, dtype=torch.float64)
    a = 0.5 + torch.rand(T - 1, generator=g, dtype=torch.float64)
    J[-1] = -(a @ J[:-1]) / (0.5 + float(torch.rand(1, generator=g, dtype=torch.float64)))
    return J


def weak_stationary(T: int, P: int, seed: int = 0) -> torch.Tensor:
    """0 on the boundary of the hull: two opposite rows of different norms, others random."""
    g = _gen(T, P, seed)
    J = torch.randn(T, P, generator=g, dtype=torch.float64)
    J[1] = -2.5 * J[0]
    return J


def rank_deficient(T: int, P: int, seed: int = 0) -> torch.Tensor:
    """Rank 2: ``A [T, 2] @ B [2, P]``, mixed signs."""
    g = _gen(T, P, seed)
    return (torch.randn(T, 2, generator=g, dtype=torch.float64)
            @ torch.randn(2, P, generator=g, dtype=torch.float64))


def zero_rows(T: int, P: int, seed: int = 0) -> torch.Tensor:
    """Normal rows with task 0 (and task 2 when T > 2) exactly zero."""
    J = normal(T, P, seed)
    J[0] = 0.0
    if T > 2:
        J[2] = 0.0
    return J


FAMILIES = {f.__name__: f for f in (normal, aligned, strong_stationary, weak_stationary,
                                     rank_deficient, zero_rows)}
"""name -> ``f(T, P, seed) -> J`` (float64)."""
