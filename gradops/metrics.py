"""Conflict statistics from Gram matrices (docs/methods.md#statistics), batched, on device, with no
host sync.

Every function takes ``G`` of shape ``[..., T, T]`` (one Gram, or a batch such as the per-segment
Grams ``[L, T, T]`` of :func:`gradops.segment_gram`) and returns tensors on ``G``'s device
(norms, cosines and GMS in ``G``'s dtype: float64 for a float64 ``G``). Rows of zero norm give
cosine 0 and GMS 0 (never NaN); non-finite Grams propagate into the results.
"""
from __future__ import annotations

import torch

__all__ = ["norms", "cosine", "gms", "conflict_incidence", "conflict_counts",
           "sign_conflict_ratio"]


def _check_gram(G: torch.Tensor, fn: str) -> None:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"gradops.metrics.{fn}: G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"gradops.metrics.{fn}: G must be [..., T, T], got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"gradops.metrics.{fn}: G must be floating point, got {G.dtype}")


def norms(G: torch.Tensor) -> torch.Tensor:
    """Gradient norms ``n_i = sqrt(G_ii)``, ``[..., T]`` (negative rounding noise clamped to 0).

    Args:
        G: a Gram ``J J^T`` ``[T, T]`` or a batch ``[..., T, T]`` (floating point).

    Returns:
        ``[..., T]`` in ``G``'s dtype.

    Raises:
        TypeError: for a ``G`` that is not a floating-point tensor.
        ValueError: for a ``G`` that is not ``[..., T, T]``.
    """
    _check_gram(G, "norms")
    return torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0).sqrt()


def _pair_norms(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = norms(G)
    return n.unsqueeze(-1), n.unsqueeze(-2)


def cosine(G: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities ``G_ij / (n_i n_j)``, ``[..., T, T]``, in ``[-1, 1]``.

    0 where either norm is 0 (Yu et al. define conflict as ``cos < 0``: zero gradients never
    conflict). NaN/Inf in ``G`` propagate (Yu et al., "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020).

    Args:
        G: a Gram ``J J^T`` ``[T, T]`` or a batch ``[..., T, T]`` (floating point).

    Returns:
        ``[..., T, T]`` in ``G``'s dtype.

    Raises:
        TypeError: for a ``G`` that is not a floating-point tensor.
        ValueError: for a ``G`` that is not ``[..., T, T]``.
    """
    _check_gram(G, "cosine")
    ni, nj = _pair_norms(G)
    denom = ni * nj
    cos = torch.where(denom == 0, torch.zeros_like(G), G / denom)
    return cos.clamp(-1.0, 1.0)


def gms(G: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude similarity ``2 n_i n_j / (n_i^2 + n_j^2)`` (Yu et al., 2020), ``[..., T,
    T]``.

    In ``[0, 1]``; 0 where both norms are 0 (undefined: reported as 0, like the cosine). Yu et
    al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.

    Args:
        G: a Gram ``J J^T`` ``[T, T]`` or a batch ``[..., T, T]`` (floating point).

    Returns:
        ``[..., T, T]`` in ``G``'s dtype.

    Raises:
        TypeError: for a ``G`` that is not a floating-point tensor.
        ValueError: for a ``G`` that is not ``[..., T, T]``.
    """
    _check_gram(G, "gms")
    ni, nj = _pair_norms(G)
    denom = ni * ni + nj * nj
    return torch.where(denom == 0, torch.zeros_like(G), 2 * ni * nj / denom)


def _upper_pairs(T: int, device: torch.device) -> torch.Tensor:
    """``[T, T]`` bool, true strictly above the diagonal. (Built from two aranges rather than
    ``triu``: on CPU ``triu`` opens an OpenMP parallel region even for a 3 x 3 input, which costs
    ~0.1 ms with sleeping (``OMP_WAIT_POLICY=PASSIVE``) threads, on every MTLOptimizer step.)"""
    i = torch.arange(T, device=device)
    return i.unsqueeze(1) < i.unsqueeze(0)


def conflict_counts(G: torch.Tensor, S: float = 0.0) -> torch.Tensor:
    """Number of unordered pairs ``i < j`` with ``cos_ij < S``, int64 ``[...]``.

    With per-layer Grams ``[L, T, T]`` and ``-1 < S <= 0`` this is Recon's S-conflict score of each
    layer for one iteration (Shi et al., ICLR 2023, Def. 3); sum it over iterations to rank layers.

    Args:
        G: a Gram ``J J^T`` ``[T, T]`` or a batch ``[..., T, T]`` (floating point).
        S: the cosine threshold, in ``[-1, 1]`` (0: conflict as ``cos < 0``).

    Returns:
        int64 ``[...]`` (a 0-dim tensor for one Gram).

    Raises:
        TypeError: for a ``G`` that is not a floating-point tensor.
        ValueError: for a ``G`` that is not ``[..., T, T]``, or ``S`` outside ``[-1, 1]``.
    """
    if not -1.0 <= S <= 1.0:
        raise ValueError(f"gradops.metrics.conflict_counts: S must be in [-1, 1], got {S}")
    if S == 0.0:
        # cos_ij < 0 exactly when G_ij < 0 (the norms are >= 0, and a zero norm makes G_ij = 0;
        # NaN is < 0 in neither form): three ops instead of the cosine's dozen, on the hot path
        # of every MTLOptimizer step
        _check_gram(G, "conflict_counts")
        below = G < 0
    else:
        below = cosine(G) < S
    return (below & _upper_pairs(G.shape[-1], G.device)).sum(dim=(-2, -1))


def conflict_incidence(G: torch.Tensor) -> torch.Tensor:
    """Incidence of gradient conflict ``N_gc / N_all`` (Zhang et al., sparse-training paper, §4.1).

    ``N_all = T(T-1)/2`` unordered pairs, ``N_gc`` those with ``cos < 0``. float32 ``[...]``
    (float64 for a float64 ``G``); 0 when ``T == 1`` (no pairs).

    Args:
        G: a Gram ``J J^T`` ``[T, T]`` or a batch ``[..., T, T]`` (floating point).

    Returns:
        float32 ``[...]`` (float64 for a float64 ``G``), in ``[0, 1]``.

    Raises:
        TypeError: for a ``G`` that is not a floating-point tensor.
        ValueError: for a ``G`` that is not ``[..., T, T]``.
    """
    T = G.shape[-1] if G.dim() >= 2 else 0
    n_all = T * (T - 1) // 2
    counts = conflict_counts(G, 0.0)
    dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    return counts.to(dtype) / max(n_all, 1)


def sign_conflict_ratio(opposite: torch.Tensor, both_nonzero: torch.Tensor) -> torch.Tensor:
    """Fraction of coordinates with opposite signs among those where both gradients are non-zero
    (Elich et al., "ratio of conflicting gradient parameters"); 0 where no coordinate is non-zero
    in both. Inputs are the counts of ``gram(..., return_sign_counts=True)``.

    Args:
        opposite: per pair, the coordinates where the two gradients have opposite signs.
        both_nonzero: per pair, the coordinates where both are non-zero (same shape).

    Returns:
        float32, of the inputs' shape.

    Raises:
        ValueError: when the two shapes differ.
    """
    if opposite.shape != both_nonzero.shape:
        raise ValueError("gradops.metrics.sign_conflict_ratio: opposite and both_nonzero must have "
                         f"the same shape, got {tuple(opposite.shape)} and "
                         f"{tuple(both_nonzero.shape)}")
    den = both_nonzero.to(torch.float32)
    return torch.where(den == 0, torch.zeros_like(den), opposite.to(torch.float32) / den)
