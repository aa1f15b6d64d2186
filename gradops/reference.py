"""Pure-torch reference implementations of every gradops op.

These are the ``torch`` backend (any device) and the ground truth the tests compare the fused
kernels against. They favour obviousness over speed: matrix products per segment, fp32
accumulation (``float64`` when the input is ``float64``, which tests use). Math: SPEC.md §1.
"""
from __future__ import annotations

import torch


def _acc_dtype(J: torch.Tensor) -> torch.dtype:
    return torch.float64 if J.dtype == torch.float64 else torch.float32


def gram_reference(J: torch.Tensor) -> torch.Tensor:
    """``G = J J^T`` accumulated in fp32 (fp64 for fp64 input). ``J``: ``[T, P]`` -> ``[T, T]``."""
    X = J.to(_acc_dtype(J))
    return X @ X.T


def segment_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each segment of a segment table (reads the values on the host)."""
    o = offsets.tolist()
    return list(zip(o[:-1], o[1:]))


def segment_gram_reference(J: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-segment Grams ``G[l] = J_l J_l^T`` (Recon's per-layer Grams), ``[L, T, T]``.

    Empty segments give zero matrices; ``result.sum(0)`` equals :func:`gram_reference` up to
    rounding.
    """
    X = J.to(_acc_dtype(J))
    bounds = segment_bounds(offsets)
    out = X.new_zeros(len(bounds), J.shape[0], J.shape[0])
    for l, (a, b) in enumerate(bounds):
        if b > a:
            out[l] = X[:, a:b] @ X[:, a:b].T
    return out


def sign_counts_reference(J: torch.Tensor, offsets: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair ``(i, j)``: coordinates where ``J_i`` and ``J_j`` have opposite signs, and where both
    are non-zero (Elich et al., sign-conflict ratio = opposite / both_nonzero). int64.

    An entry takes part only if it is ``> 0`` or ``< 0``: zeros (and -0.0) and NaN are neither.
    With ``offsets``, counts per segment ``[L, T, T]``; without, ``[T, T]``.
    """
    whole = offsets is None
    if whole:
        offsets = torch.tensor([0, J.shape[1]])
    pos = (J > 0).to(torch.float64)
    neg = (J < 0).to(torch.float64)
    nz = pos + neg
    bounds = segment_bounds(offsets)
    T = J.shape[0]
    opp = torch.zeros(len(bounds), T, T, dtype=torch.int64, device=J.device)
    both = torch.zeros_like(opp)
    for l, (a, b) in enumerate(bounds):
        if b > a:
            p, n, z = pos[:, a:b], neg[:, a:b], nz[:, a:b]
            opp[l] = (p @ n.T + n @ p.T).round().to(torch.int64)
            both[l] = (z @ z.T).round().to(torch.int64)
    return (opp[0], both[0]) if whole else (opp, both)
