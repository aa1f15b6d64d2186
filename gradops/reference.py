"""Pure-torch reference implementations of every gradops op.

These are the ``torch`` backend (any device) and the ground truth the tests compare the fused
kernels against. They favour obviousness over speed: matrix products per segment, fp32
accumulation (``float64`` when the input is ``float64``, which tests use). The math:
docs/methods.md.
"""
from __future__ import annotations

import torch

from .segments import segment_bounds


def _acc_dtype(J: torch.Tensor) -> torch.dtype:
    return torch.float64 if J.dtype == torch.float64 else torch.float32


def gram_reference(J: torch.Tensor) -> torch.Tensor:
    """``G = J J^T`` accumulated in fp32 (fp64 for fp64 input). ``J``: ``[T, P]`` -> ``[T, T]``."""
    X = J.to(_acc_dtype(J))
    return X @ X.T


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
    """Per pair ``(i, j)``: coordinates where ``J_i`` and ``J_j`` have opposite signs, and where
    both
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


def combine_reference(J: torch.Tensor, weights: torch.Tensor,
                      offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``w^T J`` (``weights`` ``[T]``), or per segment ``w_l^T J_l`` (``weights`` ``[L, T]``).

    fp32 math (fp64 for fp64 input); returns ``J``'s dtype.
    """
    X = J.to(_acc_dtype(J))
    w = weights.to(X.dtype)
    if offsets is None:  # one weight vector ([T], or [1, T])
        return (w.reshape(-1) @ X).to(J.dtype)
    out = X.new_empty(J.shape[1])
    for l, (a, b) in enumerate(segment_bounds(offsets)):
        out[a:b] = w[l] @ X[:, a:b]
    return out.to(J.dtype)


def pcgrad_reference(J: torch.Tensor, perms: torch.Tensor, reduction: str = "sum",
                     eps: float = 0.0, libmtl_self_visit: bool = False) -> torch.Tensor:
    """PCGrad in its vector form (Yu et al., "Gradient Surgery for Multi-Task Learning", Alg. 1),
    projecting vectors pair by pair as the paper and LibMTL do.

    For each task ``i``: ``g_i' = g_i``; for ``j`` in ``perms[i]`` (a permutation of all tasks),
    ``j != i`` (the paper's; ``libmtl_self_visit=True``: ``j = i`` too, as LibMTL's shuffle of all
    tasks): if ``g_i' . g_j < 0``, ``g_i' -= (g_i' . g_j) / (||g_j||^2 + eps) g_j``.
    Returns ``sum_i g_i'`` (``reduction="sum"``) or the mean. Math in ``J``'s dtype (use fp64 for
    ground truth). A zero ``g_j`` never projects (its dot products are exactly 0).
    """
    T = J.shape[0]
    out = torch.zeros_like(J[0])
    for i in range(T):
        g = J[i].clone()
        for j in perms[i].tolist():
            if j == i and not libmtl_self_visit:
                continue
            d = torch.dot(g, J[j])
            if d < 0:
                g = g - d / (torch.dot(J[j], J[j]) + eps) * J[j]
        out += g
    return out / T if reduction == "mean" else out


def philox_uniform_reference(seed: int, columns: torch.Tensor) -> torch.Tensor:
    """GradDrop's uniform numbers in [0, 1): ``U_k`` is output word ``k % 4`` of Philox4x32-10
    (Salmon et al., SC 2011) at counter ``(j_lo, j_hi, 0, 0)``, ``j = k // 4``, key
    ``(seed_lo, seed_hi)``, i.e. Triton's ``tl.rand4x(seed, k // 4)[k % 4]``; one Philox call
    serves four consecutive columns. Identical in the C++ kernels. ``columns``: int64 tensor of
    column indices ``k``. Returns float32 of the same shape."""
    M32 = 0xFFFFFFFF
    col = columns.to(torch.int64)
    ctr = col >> 2
    c0 = ctr & M32
    c1 = (ctr >> 32) & M32
    c2 = torch.zeros_like(ctr)
    c3 = torch.zeros_like(ctr)
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(0xCD9E8D57, c2)  # 32x32-bit products split: int64 would overflow
        hi1, lo1 = _mulhilo32(0xD2511F53, c0)
        c0, c1, c2, c3 = hi0 ^ c1 ^ k0, lo0, hi1 ^ c3 ^ k1, lo1
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    word = torch.stack([c0, c1, c2, c3]).gather(0, (col & 3)[None]).squeeze(0)
    x = torch.where(word >= 1 << 31, word - (1 << 32), word)  # as int32
    x = torch.where(x < 0, -x - 1, x)                         # ~x
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for uint32 ``a`` and int64 tensors ``b`` in [0, 2^32)."""
    M16, M32 = 0xFFFF, 0xFFFFFFFF
    a_lo, a_hi = a & M16, a >> 16
    b_lo, b_hi = b & M16, b >> 16
    lo_lo = a_lo * b_lo
    mid1 = a_hi * b_lo
    mid2 = a_lo * b_hi
    hi_hi = a_hi * b_hi
    mid = (lo_lo >> 16) + (mid1 & M16) + (mid2 & M16)
    lo = ((mid & M16) << 16) | (lo_lo & M16)
    hi = hi_hi + (mid1 >> 16) + (mid2 >> 16) + (mid >> 16)
    return hi & M32, lo & M32


def graddrop_reference(J: torch.Tensor, leak: torch.Tensor, noise: torch.Tensor,
                       eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """GradDrop on parameter gradients (Chen et al., "Just Pick a Sign", NeurIPS 2020, Eq. 1-3;
    docs/methods.md#graddrop), given the uniform numbers ``noise`` ``[P]``.

    ``p_k = 0.5 (1 + S_k / ((1 + eps) A_k))`` with ``S_k = sum_t J_tk``, ``A_k = sum_t |J_tk|``
    (``eps`` is relative, so ``p`` does not depend on the gradients' scale), and ``p_k = 0.5``
    where ``A_k = 0`` (a column of zeros: ``0 / 0``);
    ``M_tk = [p_k > U_k][J_tk > 0] + [p_k < U_k][J_tk < 0]``;
    ``g_k = sum_t (leak_t + (1 - leak_t) M_tk) J_tk``. Returns ``(g, M)``; math in fp32.
    """
    X = J.to(_acc_dtype(J))
    S = X.sum(0)
    A = X.abs().sum(0)
    q = torch.where(A == 0, torch.zeros_like(S), S / A)   # NaN / Inf in A stay NaN
    p = 0.5 * (1 + q * (1.0 / (1.0 + eps)))
    U = noise.to(X.dtype)
    M = ((p > U) & (X > 0)) | ((p < U) & (X < 0))
    lk = leak.to(X.dtype)[:, None]
    g = ((lk + (1 - lk) * M.to(X.dtype)) * X).sum(0)
    return g.to(J.dtype), M


def topk_mask_reference(W: torch.Tensor, k: int) -> torch.Tensor:
    """Per-neuron top-K magnitude mask (PSN, the sparse-training paper's Sec. 3.4;
    docs/methods.md#sparse-training).

    ``W`` is viewed as ``[out, F]`` (dim 0 = output neurons, the rest flattened: a conv weight
    ``[out, in, kh, kw]`` has ``F = in * kh * kw``); in each row the ``min(k, F)`` entries of
    largest ``|W|`` are kept, ties broken by lower column index (a stable sort). Returns a bool
    mask of ``W``'s shape. Magnitudes are compared in float64 for float64 ``W``, in float32
    otherwise (bf16 / fp16 convert exactly); NaN ranks above every number, ``+inf`` included
    (a descending sort puts it first), and NaNs tie with each other."""
    if W.dim() == 0:
        raise ValueError("gradops.topk_mask: W must have at least one dimension")
    rows = W.reshape(W.shape[0], -1)   # a 1-D W is [out, 1]
    F = rows.shape[1]
    K = min(int(k), F)
    mag = rows.abs().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    # descending, stable: equal magnitudes keep their column order, so the lower index wins
    order = torch.sort(mag, dim=1, descending=True, stable=True).indices[:, :K]
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=W.device)
    mask.scatter_(1, order, True)
    return mask.reshape(W.shape)


def linear_gram_reference(X: torch.Tensor, D: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """The Gram of a Linear layer's per-task gradients, formed explicitly: row ``t`` of the
    layer's ``J`` is ``vec(D_t^T X)`` (and ``D_t^T 1`` with ``bias``), then ``J J^T`` in float64.
    ``X``: ``[N, in]``, ``D``: ``[T, N, out]`` -> ``[T, T]`` float64."""
    X64, D64 = X.to(torch.float64), D.to(torch.float64)
    rows = [torch.matmul(D64.transpose(1, 2), X64).reshape(D.shape[0], -1)]
    if bias:
        rows.append(D64.sum(1))
    Jl = torch.cat(rows, 1)
    return Jl @ Jl.T


def linear_combine_reference(X: torch.Tensor, D: torch.Tensor, weights: torch.Tensor
                             ) -> torch.Tensor:
    """``sum_t w_t D_t^T X`` with the gradients formed explicitly, in float64 (``[out, in]``)."""
    g = torch.matmul(D.to(torch.float64).transpose(1, 2), X.to(torch.float64))
    return (weights.to(torch.float64)[:, None, None] * g).sum(0)
