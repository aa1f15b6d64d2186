"""Triton kernels for the iterative ``T x T`` solvers of :mod:`gradops.weighting` (GPU path).

Each solve is one Triton program that holds ``G`` (``T <= 64``, padded to a power of two) in
registers and runs the whole iteration in the kernel: one launch per solve instead of the torch
loop's ~30 launches per iteration (MGDA's 250-iteration budget is ~7,500 launches in torch), no
host synchronisation, and the loop stops on the device as soon as the iterate has converged (a
converged iterate is frozen in every backend, so stopping returns what the full budget returns).

The algorithms are the torch reference loops of :mod:`gradops.weighting` step for step:

- :func:`simplex_qp_triton`: the exact active-set solver of MGDA (``min w^T G w``, Wolfe's
  min-norm point; Sener & Koltun 2018) and CAGrad's dual (``min b^T w + k sqrt(w^T G w +
  delta2)``, Liu et al. 2021) of :func:`gradops.weighting._solvers._simplex_qp`, in float64
  whatever ``G``'s dtype (an in-register Cholesky factorisation of the corral per step; the
  loops run over the ``T`` real rows only);
- :func:`nash_newton_triton`: Nash-MTL's damped Newton iteration for ``G a = 1 / a`` (Navon et
  al. 2022), in ``G``'s dtype, with an in-register Cholesky factorisation and triangular solves
  of ``G + diag(1/a^2) + jitter I``.

Ties in the task choices go to the lowest index (as ``torch.argmin``/``argmax``); reductions run
in a different order than torch's, so iterates can differ in the last bits and, at exact ties, take
another (equally valid) path: the tests compare the backends' solutions, not their bits.
The signatures mirror the C++ CPU kernels (``gradops._C.simplex_qp_cpu`` / ``nash_newton_cpu``).
"""
from __future__ import annotations

import torch

from .. import _backend
from ._solver_tolerances import _FLOOR, _JITTER, _MARGIN

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
    def _simplex_qp_kernel(G_ptr, b_ptr, scale_ptr, k_ptr, d2_ptr, w_ptr, its_ptr,
                           gap_ptr, T, max_iter, tol, freeze_base, margin, jitter,
                           CAGRAD: tl.constexpr, BT: tl.constexpr):
        # gradops.weighting._simplex_qp, iterate for iterate, in float64 on G / scale
        rows = tl.arange(0, BT)
        ok_r = rows < T
        ok2 = ok_r[:, None] & ok_r[None, :]
        eye = rows[:, None] == rows[None, :]
        scale = tl.load(scale_ptr).to(tl.float64)
        G = tl.load(G_ptr + rows[:, None] * T + rows[None, :], mask=ok2, other=0.0)
        G = G.to(tl.float64) / scale
        zero = tl.zeros([BT], tl.float64)
        fin = tl.sum(tl.sum(tl.where(ok2 & ((tl.abs(G) < float("inf")) == 0), 1, 0), axis=1),
                     axis=0)
        fin = (fin == 0) & (tl.abs(scale) < float("inf"))
        if CAGRAD:
            b = tl.load(b_ptr + rows, mask=ok_r, other=0.0).to(tl.float64) / scale
            k = tl.load(k_ptr).to(tl.float64)
            k2 = k * k / scale
            d2 = tl.load(d2_ptr).to(tl.float64) / scale
            fin = fin & (tl.sum(tl.where(ok_r & ((tl.abs(b) < float("inf")) == 0), 1, 0),
                                 axis=0) == 0)
            fin = fin & (tl.abs(k2) < float("inf")) & (tl.abs(d2) < float("inf"))
            kk = tl.sqrt(k2)
            t_hi = 2.0 * tl.sqrt(1.0 + d2) / tl.maximum(kk, 2.2250738585072014e-308)
        else:
            b = zero
            k2 = tl.sum(zero, axis=0)
            d2 = k2
            kk = k2
            t_hi = k2
        freeze = tl.minimum(freeze_base * (1.0 + kk), tol)
        diag = tl.sum(tl.where(eye, G, 0.0), axis=1)
        i0 = tl.argmin(tl.where(ok_r, diag, float("inf")), axis=0)
        w = tl.where(rows == i0, zero + 1.0, zero)
        ok = fin | True
        stalled = ok & False
        settled = ok & False
        t = k2 * 0.0
        t_lo = t
        its = tl.sum(ok_r.to(tl.int32), axis=0) * 0
        # gaps at w
        Gw = tl.sum(G * w[None, :], axis=1)
        gr = tl.where(ok_r, Gw + t * b, 0.0)
        gw = tl.sum(gr * w, axis=0)
        gq = gw - tl.min(tl.where(ok_r, gr, float("inf")), axis=0)
        if CAGRAD:
            rho = tl.sqrt(tl.maximum(tl.sum(w * Gw, axis=0) + d2, 2.2250738585072014e-308))
            grf = tl.where(ok_r, b + kk * Gw / rho, 0.0)
            gap = tl.sum(grf * w, axis=0) - tl.min(tl.where(ok_r, grf, float("inf")), axis=0)
        else:
            gap = 2.0 * gq
        s = tl.argmin(tl.where(ok_r, gr, float("inf")), axis=0)
        ws = tl.sum(tl.where(rows == s, w, 0.0), axis=0)
        grs = tl.sum(tl.where(rows == s, gr, 0.0), axis=0)
        can_add = (grs < gw - margin * (1.0 + t)) & (ws <= 0) & (stalled == 0)
        if CAGRAD:
            inner_done = ok & (can_add == 0)
            done = (gap <= freeze) | settled
        else:
            inner_done = ok & False
            done = (gap <= freeze) | (ok & (can_add == 0))
        if fin == 0:
            its = max_iter
            done = ok & False
        while (its < max_iter) & (done == 0):
            add = ok & can_add & (inner_done == 0)
            S = ok_r & ((w > 0) | (add & (rows == s)))
            p = tl.argmax(tl.where(ok_r, w, -float("inf")), axis=0)
            Sp = S & (rows != p)
            ep = tl.where(rows == p, zero + 1.0, zero)
            Gp = tl.sum(G * ep[None, :], axis=1)
            Gpp = tl.sum(Gp * ep, axis=0)
            bp = tl.sum(b * ep, axis=0)
            H = G - Gp[:, None] - Gp[None, :] + Gpp
            M2 = Sp[:, None] & Sp[None, :]
            H = tl.where(M2, H, 0.0) + tl.where(eye, tl.where(Sp, jitter, 1.0)[:, None], 0.0)
            r1 = tl.where(Sp, Gpp - Gp, zero)
            r2 = tl.where(Sp, bp - b, zero)
            # Cholesky H = L L^T (right-looking), a pivot <= 0 or NaN is a failure
            Lm = tl.zeros([BT, BT], tl.float64)
            bad = its * 0
            for j in range(0, T):                  # the padding is the identity
                colj = tl.sum(tl.where(rows[None, :] == j, H, 0.0), axis=1)
                djj = tl.sum(tl.where(rows == j, colj, 0.0), axis=0)
                bad += tl.where(djj > 0, 0, 1)
                dd = tl.sqrt(tl.maximum(djj, 2.2250738585072014e-308))
                lcol = tl.where(rows >= j, colj / dd, 0.0)
                Lm = tl.where(rows[None, :] == j, lcol[:, None], Lm)
                H = H - lcol[:, None] * lcol[None, :]
            y1 = zero
            y2 = zero
            for j in range(0, T):
                lrow = tl.sum(tl.where(rows[:, None] == j, Lm, 0.0), axis=0)
                ljj = tl.sum(tl.where(rows == j, lrow, 0.0), axis=0)
                v1 = tl.sum(tl.where(rows == j, r1, 0.0), axis=0)
                v2 = tl.sum(tl.where(rows == j, r2, 0.0), axis=0)
                y1 = tl.where(rows == j, (v1 - tl.sum(tl.where(rows < j, lrow * y1, 0.0),
                                                      axis=0)) / ljj, y1)
                y2 = tl.where(rows == j, (v2 - tl.sum(tl.where(rows < j, lrow * y2, 0.0),
                                                      axis=0)) / ljj, y2)
            x1 = zero
            x2 = zero
            for jj in range(0, T):
                j = T - 1 - jj
                lcol = tl.sum(tl.where(rows[None, :] == j, Lm, 0.0), axis=1)
                ljj = tl.sum(tl.where(rows == j, lcol, 0.0), axis=0)
                v1 = tl.sum(tl.where(rows == j, y1, 0.0), axis=0)
                v2 = tl.sum(tl.where(rows == j, y2, 0.0), axis=0)
                x1 = tl.where(rows == j, (v1 - tl.sum(tl.where(rows > j, lcol * x1, 0.0),
                                                      axis=0)) / ljj, x1)
                x2 = tl.where(rows == j, (v2 - tl.sum(tl.where(rows > j, lcol * x2, 0.0),
                                                      axis=0)) / ljj, x2)
            x1 = tl.where(Sp, x1, zero)
            x2 = tl.where(Sp, x2, zero)
            nonfin = tl.sum(tl.where(tl.abs(x1) < float("inf"), 0, 1)
                            + tl.where(tl.abs(x2) < float("inf"), 0, 1), axis=0)
            fail = (bad > 0) | (nonfin > 0)
            alpha = x1 + ep * (1.0 - tl.sum(x1, axis=0))
            beta = x2 - ep * tl.sum(x2, axis=0)
            if CAGRAD:
                if inner_done:                       # outer step: a new t
                    psi_pos = tl.sum(w * Gw, axis=0) + d2 > k2 * t * t
                    lo = tl.where(psi_pos, t, t_lo)
                    hi = tl.where(psi_pos, t_hi, t)
                    Gb = tl.sum(G * beta[None, :], axis=1)
                    Ga = tl.sum(G * alpha[None, :], axis=1)
                    den = k2 - tl.sum(beta * Gb, axis=0)
                    tS = tl.sqrt(tl.maximum(tl.sum(alpha * Ga, axis=0) + d2,
                                            2.2250738585072014e-308)
                                 / tl.maximum(den, 2.2250738585072014e-308))
                    newton = (den > 0) & (tS >= lo) & (tS <= hi) & (fail == 0)
                    t_new = tl.where(newton, tS, 0.5 * (lo + hi))
                    settled = tl.abs(t_new - t) <= margin * t
                    t_lo = lo
                    t_hi = hi
                    t = t_new
                    ok = ok & False
                    stalled = ok & False
                else:
                    settled = ok & False
            if inner_done == 0:
                if fail:
                    stalled = ok | True
                else:
                    a = alpha + t * beta
                    neg = S & (a < 0)
                    ratio = tl.where(neg, w / tl.maximum(w - a, 2.2250738585072014e-308),
                                     float("inf"))
                    jdrop = tl.argmin(ratio, axis=0)
                    full = tl.sum(neg.to(tl.int32), axis=0) == 0
                    theta = tl.where(full, 0.0, tl.min(ratio, axis=0))
                    w_full = tl.where(S, tl.maximum(a, 0.0), zero)
                    w_part = tl.where(rows == jdrop, zero,
                                      tl.maximum(w + theta * (a - w), 0.0))
                    w_new = tl.where(full, w_full, w_part)
                    w_new = tl.where(ok_r, w_new, zero)
                    w = w_new / tl.sum(w_new, axis=0)
                    ok = full
            its += 1
            Gw = tl.sum(G * w[None, :], axis=1)
            gr = tl.where(ok_r, Gw + t * b, 0.0)
            gw = tl.sum(gr * w, axis=0)
            gq = gw - tl.min(tl.where(ok_r, gr, float("inf")), axis=0)
            if CAGRAD:
                rho = tl.sqrt(tl.maximum(tl.sum(w * Gw, axis=0) + d2, 2.2250738585072014e-308))
                grf = tl.where(ok_r, b + kk * Gw / rho, 0.0)
                gap = tl.sum(grf * w, axis=0) - tl.min(tl.where(ok_r, grf, float("inf")), axis=0)
            else:
                gap = 2.0 * gq
            s = tl.argmin(tl.where(ok_r, gr, float("inf")), axis=0)
            ws = tl.sum(tl.where(rows == s, w, 0.0), axis=0)
            grs = tl.sum(tl.where(rows == s, gr, 0.0), axis=0)
            can_add = (grs < gw - margin * (1.0 + t)) & (ws <= 0) & (stalled == 0)
            if CAGRAD:
                inner_done = ok & (can_add == 0)
                done = (gap <= freeze) | settled
            else:
                done = (gap <= freeze) | (ok & (can_add == 0))
        if fin == 0:
            w = zero + float("nan")
            gap = gap * float("nan")
        tl.store(w_ptr + rows, w.to(w_ptr.dtype.element_ty), mask=ok_r)
        tl.store(its_ptr, its.to(tl.int64))
        tl.store(gap_ptr, gap.to(gap_ptr.dtype.element_ty))     # converged: by the caller

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


def simplex_qp_triton(G: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor,
                      k: torch.Tensor | None, delta2: torch.Tensor | None, max_iter: int,
                      tol: float, tiny: float):
    """The active-set solver of MGDA (``b`` None) or CAGrad (:func:`gradops.weighting._solvers.
    _simplex_qp`) in one Triton program, in float64: ``(w, converged, iterations, gap)``,
    device tensors in ``G``'s dtype (bool / int64 0-dim status). ``tiny`` is unused (the
    signature of the C++ kernel)."""
    out = _outputs(G)
    cag = b is not None
    dummy = scale.reshape(1)
    _simplex_qp_kernel[(1,)](G.contiguous(), b.contiguous() if cag else dummy, dummy,
                             k.reshape(1) if cag else dummy, delta2.reshape(1) if cag else dummy,
                             out[0], out[2], out[3], G.shape[0], max_iter, float(tol),
                             _FLOOR, _MARGIN,
                             _JITTER * G.shape[0], CAGRAD=cag, BT=_block(G.shape[0]),
                             num_warps=4)
    w, _, its, gap = out
    return w, gap <= tol, its, gap     # in G's dtype, as the torch loop compares


def nash_newton_triton(Gn: torch.Tensor, max_iter: int, tol: float, tiny: float, jitter: float):
    """Nash-MTL's damped Newton loop on the normalised Gram in one Triton program:
    ``(a, converged, iterations, residual)``."""
    out = _outputs(Gn)
    _nash_newton_kernel[(1,)](Gn.contiguous(), *out, Gn.shape[0], max_iter, tol, tiny, jitter,
                              BT=_block(Gn.shape[0]), num_warps=4)
    return out
