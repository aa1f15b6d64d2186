"""Triton kernels for the iterative ``T x T`` solvers of :mod:`gradops.weighting` (GPU path).

Each solve is one Triton program that holds ``G`` (``T <= 64``, padded to a power of two) in
registers and runs the whole iteration in the kernel: one launch per solve instead of the torch
loop's ~30 launches per iteration (MGDA's 250-iteration budget is ~7,500 launches in torch), no
host synchronisation, and the loop stops on the device as soon as the iterate has converged (a
converged iterate is frozen in every backend, so stopping returns what the full budget returns).

The algorithms are the torch reference loops of :mod:`gradops.weighting` step for step, in ``G``'s
dtype (fp32 or fp64):

- :func:`pairwise_fw_triton`: pairwise Frank-Wolfe on the simplex with exact line search, for
  MGDA (``min w^T G w``, Sener & Koltun 2018, Alg. 2) and CAGrad's dual
  (``min b^T w + k sqrt(w^T G w + delta2)``, Liu et al. 2021, Alg. 1);
- :func:`nash_newton_triton`: Nash-MTL's damped Newton iteration for ``G a = 1 / a`` (Navon et
  al. 2022), with an in-register Cholesky factorisation and triangular solves of
  ``G + diag(1/a^2) + jitter I``.

Ties in the vertex choice go to the lowest index (as ``torch.argmin``/``argmax``); reductions run
in a different order than torch's, so iterates can differ in the last bits and, at exact ties, take
another (equally valid) path: the tests compare the backends' solutions, not their bits.
The signatures mirror the C++ CPU kernels (``gradops._C.pairwise_fw_cpu`` / ``nash_newton_cpu``).
"""
from __future__ import annotations

import torch

from .. import _backend

MAX_T = 64
"""Largest ``T`` the Triton solvers take (``G`` lives in the registers of one program)."""

if _backend.triton_importable()[0]:
    import triton
    import triton.language as tl

    @triton.jit
    def _sqrt(x):
        # IEEE square root in fp32 (tl.sqrt is the fast approximate one there) and fp64
        if x.dtype == tl.float64:
            return tl.sqrt(x)
        else:
            return tl.sqrt_rn(x)

    @triton.jit
    def _nash_residual(a, Ga, ok):
        # max_i |a_i (G a)_i - 1|, NaN when any term is NaN (as torch's max; tl.max drops NaN)
        r = tl.abs(a * Ga - 1.0)
        m = tl.max(tl.where(ok, r, 0.0), axis=0)
        nan = tl.sum(tl.where(ok & (r != r), 1, 0), axis=0) > 0
        return tl.where(nan, float("nan"), m)

    @triton.jit
    def _pairwise_fw_kernel(G_ptr, b_ptr, scale_ptr, k_ptr, d2_ptr, w_ptr, conv_ptr, its_ptr,
                            gap_ptr, T, max_iter, tol, tiny, CAGRAD: tl.constexpr,
                            BT: tl.constexpr):
        rows = tl.arange(0, BT)
        ok = rows < T
        G = tl.load(G_ptr + rows[:, None] * T + rows[None, :], mask=ok[:, None] & ok[None, :],
                    other=0.0)
        zero = tl.zeros([BT], G.dtype)
        scale = tl.load(scale_ptr)
        if CAGRAD:
            b = tl.load(b_ptr + rows, mask=ok, other=0.0)
            k = tl.load(k_ptr)
            d2 = tl.load(d2_ptr)
        else:
            b = zero
            k = tl.sum(zero, axis=0)
            d2 = k
        w = tl.where(ok, zero + 1.0, zero) / T
        its = tl.sum(ok.to(tl.int32), axis=0) * 0
        Gw = tl.sum(G * w[None, :], axis=1)
        if CAGRAD:
            gr = b + k * Gw / _sqrt(tl.maximum(tl.sum(w * Gw, axis=0), 0.0) + d2)
        else:
            gr = 2.0 * Gw
        gap = (tl.sum(gr * w, axis=0) - tl.min(tl.where(ok, gr, float("inf")), axis=0)) / scale
        done = gap <= tol
        while (its < max_iter) & (done == 0):
            s = tl.argmin(tl.where(ok, gr, float("inf")), axis=0)
            v = tl.argmax(tl.where(ok & (w > 0), gr, -float("inf")), axis=0)
            delta = tl.where(rows == s, zero + 1.0, zero) - tl.where(rows == v, zero + 1.0, zero)
            wv = tl.sum(tl.where(rows == v, w, zero), axis=0)
            Gd = tl.sum(G * delta[None, :], axis=1)
            A = tl.sum(delta * Gd, axis=0)                   # curvature d^T G d >= 0
            B = tl.sum(w * Gd, axis=0)                       # (G w)_s - (G w)_v
            if CAGRAD:                                       # a g + k sqrt(A g^2 + 2 B g + C)
                a = tl.sum(b * delta, axis=0)
                C = tl.maximum(tl.sum(w * Gw, axis=0), 0.0) + d2
                Ac = tl.maximum(A, tiny)
                r = (a / tl.maximum(k, tiny)) * (a / tl.maximum(k, tiny))
                Dq = tl.maximum(C - B * B / Ac, 0.0)
                interior = (A > r) & (k > 0)
                u = _sqrt(r * Dq / tl.maximum(Ac * (A - r), tiny))
                u = tl.where(a > 0, -u, u)                   # sign(u) = -sign(a) at the optimum
                g_int = u - B / Ac
                g_mono = tl.where(a < 0, float("inf"), 0.0)  # f monotone along the direction
                gamma = tl.where(interior, g_int, g_mono)
            else:                                            # quadratic: gamma* = -B / A
                gamma = -B / tl.maximum(A, tiny)
            gamma = tl.where(gamma != gamma, 0.0, gamma)     # NaN -> no move
            gamma = tl.minimum(tl.maximum(gamma, 0.0), wv)
            w = w + gamma * delta
            w = tl.where(rows == v, tl.maximum(w, 0.0), w)   # exact drop of the away vertex
            its += 1
            Gw = tl.sum(G * w[None, :], axis=1)
            if CAGRAD:
                gr = b + k * Gw / _sqrt(tl.maximum(tl.sum(w * Gw, axis=0), 0.0) + d2)
            else:
                gr = 2.0 * Gw
            gap = (tl.sum(gr * w, axis=0)
                   - tl.min(tl.where(ok, gr, float("inf")), axis=0)) / scale
            done = gap <= tol
        tl.store(w_ptr + rows, w, mask=ok)
        tl.store(conv_ptr, done)
        tl.store(its_ptr, its.to(tl.int64))
        tl.store(gap_ptr, gap)

    @triton.jit
    def _nash_newton_kernel(G_ptr, a_ptr, conv_ptr, its_ptr, res_ptr, T, max_iter, tol, tiny,
                            jitter, BT: tl.constexpr):
        rows = tl.arange(0, BT)
        ok = rows < T
        ok2 = ok[:, None] & ok[None, :]
        G = tl.load(G_ptr + rows[:, None] * T + rows[None, :], mask=ok2, other=0.0)
        eye = rows[:, None] == rows[None, :]
        zero = tl.zeros([BT], G.dtype)
        one = zero + 1.0
        diag = tl.sum(tl.where(eye, G, 0.0), axis=1)
        # start: a_i = 1 / sqrt(G_ii), scaled so that a^T G a = T
        a = tl.where(ok, one / _sqrt(tl.maximum(diag, tiny)), zero)
        q = tl.sum(a * tl.sum(G * a[None, :], axis=1), axis=0)
        a = a * _sqrt(T / tl.maximum(q, tiny))
        its = tl.sum(ok.to(tl.int32), axis=0) * 0
        Ga = tl.sum(G * a[None, :], axis=1)
        res = _nash_residual(a, Ga, ok)
        done = res <= tol
        while (its < max_iter) & (done == 0):
            a_safe = tl.where(ok, a, one)
            grad = tl.where(ok, Ga - 1.0 / a_safe, zero)
            H = G + tl.where(eye & ok2, 1.0 / (a_safe * a_safe)[:, None] + jitter, 0.0)
            H = tl.where(ok2, H, tl.where(eye, 1.0, 0.0))    # identity on the padding
            # Cholesky H = L L^T, column by column (right-looking), L kept in `Lm`
            Lm = tl.zeros([BT, BT], G.dtype)
            for j in range(0, BT):
                colj = tl.sum(tl.where(rows[None, :] == j, H, 0.0), axis=1)   # H[:, j]
                djj = tl.sum(tl.where(rows == j, colj, 0.0), axis=0)
                d = _sqrt(djj)                                              # NaN if not PD
                lcol = tl.where(rows >= j, colj / d, 0.0)
                Lm = tl.where(rows[None, :] == j, lcol[:, None], Lm)
                H = H - lcol[:, None] * lcol[None, :]
            # forward solve L y = -grad, then back solve L^T x = y
            y = zero
            for j in range(0, BT):
                lrow = tl.sum(tl.where(rows[:, None] == j, Lm, 0.0), axis=0)  # L[j, :]
                ljj = tl.sum(tl.where(rows == j, lrow, 0.0), axis=0)
                rj = tl.sum(tl.where(rows == j, -grad, 0.0), axis=0)
                yj = (rj - tl.sum(tl.where(rows < j, lrow * y, 0.0), axis=0)) / ljj
                y = tl.where(rows == j, yj, y)
            x = zero
            for jj in range(0, BT):
                j = BT - 1 - jj
                lcol = tl.sum(tl.where(rows[None, :] == j, Lm, 0.0), axis=1)  # L[:, j]
                ljj = tl.sum(tl.where(rows == j, lcol, 0.0), axis=0)
                yj = tl.sum(tl.where(rows == j, y, 0.0), axis=0)
                xj = (yj - tl.sum(tl.where(rows > j, lcol * x, 0.0), axis=0)) / ljj
                x = tl.where(rows == j, xj, x)
            step = tl.where(ok, x, zero)
            lam = _sqrt(tl.maximum(-tl.sum(grad * step, axis=0), 0.0))
            t = tl.where(lam < 0.25, 1.0, 1.0 / (1.0 + lam))
            a_new = a + t * step
            a = tl.where(ok, tl.where(a_new > 0, a_new, 0.5 * a), zero)   # rounding guard
            its += 1
            Ga = tl.sum(G * a[None, :], axis=1)
            res = _nash_residual(a, Ga, ok)
            done = res <= tol
        tl.store(a_ptr + rows, a, mask=ok)
        tl.store(conv_ptr, done)
        tl.store(its_ptr, its.to(tl.int64))
        tl.store(res_ptr, res)


def _block(T: int) -> int:
    return max(16, 1 << (T - 1).bit_length())


def _outputs(G: torch.Tensor):
    """Empty results of a solve on ``G``: the weights ``[T]``, converged, iterations, residual."""
    dev, dt = G.device, G.dtype
    return (torch.empty(G.shape[0], dtype=dt, device=dev),
            torch.empty((), dtype=torch.bool, device=dev),
            torch.empty((), dtype=torch.int64, device=dev),
            torch.empty((), dtype=dt, device=dev))


def pairwise_fw_triton(G: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor,
                       k: torch.Tensor | None, delta2: torch.Tensor | None, max_iter: int,
                       tol: float, tiny: float):
    """Pairwise Frank-Wolfe (MGDA when ``b`` is None, else CAGrad's smoothed dual) in one Triton
    program: ``(w, converged, iterations, gap)``, device tensors in ``G``'s dtype (bool / int64
    0-dim status)."""
    out = _outputs(G)
    cag = b is not None
    dummy = scale.reshape(1)
    _pairwise_fw_kernel[(1,)](G.contiguous(), b.contiguous() if cag else dummy, dummy,
                              k.reshape(1) if cag else dummy, delta2.reshape(1) if cag else dummy,
                              *out, G.shape[0], max_iter, tol, tiny, CAGRAD=cag,
                              BT=_block(G.shape[0]), num_warps=4)
    return out


def nash_newton_triton(Gn: torch.Tensor, max_iter: int, tol: float, tiny: float, jitter: float):
    """Nash-MTL's damped Newton loop on the normalised Gram in one Triton program:
    ``(a, converged, iterations, residual)``."""
    out = _outputs(Gn)
    _nash_newton_kernel[(1,)](Gn.contiguous(), *out, Gn.shape[0], max_iter, tol, tiny, jitter,
                              BT=_block(Gn.shape[0]), num_warps=4)
    return out
