"""Independent test oracles for gradops.weighting: each paper's algorithm in its *vector* form on
``J`` (numpy float64; scipy where the paper's code uses a solver), never from the Gram formulas of
``gradops.weighting``. Every function takes ``J`` ``[T, P]`` (array-like) and returns the update
``d`` ``[P]`` (and, where useful, the weights) in float64.

These are kept apart from :mod:`gradops.reference` on purpose: ``gradops.reference`` holds the
ops' torch references (which also serve as the ``torch`` backend), while these re-derive each
method from its paper a second, different way, so that a mistake shared by the Gram form and its
reference cannot pass unseen.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import optimize


def _np(J) -> np.ndarray:
    try:
        import torch
        if isinstance(J, torch.Tensor):
            return J.detach().double().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(J, dtype=np.float64)


# ------------------------------------------------------------------------------------------ #
# MGDA
# ------------------------------------------------------------------------------------------ #

def min_norm_point_wolfe(points: np.ndarray, tol: float = 1e-13, max_iter: int = 10_000
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Wolfe's (1976) exact min-norm-point algorithm on the rows of ``points``: the point of their
    convex hull closest to 0, and convex weights. Major cycles add the most violating point,
    minor cycles move to the affine minimiser of the corral, dropping points that leave it."""
    X = points
    T = X.shape[0]
    scale = max(float((X * X).sum(1).max()), 1e-300)
    S = [int(np.argmin((X * X).sum(1)))]
    lam = np.array([1.0])
    x = X[S[0]].copy()
    for _ in range(max_iter):
        j = int(np.argmin(X @ x))
        if x @ x - X[j] @ x <= tol * scale or j in S:
            break
        S.append(j)
        lam = np.append(lam, 0.0)
        while True:
            P = X[S]
            k = len(S)
            K = np.zeros((k + 1, k + 1))
            K[:k, :k] = P @ P.T
            K[:k, k] = 1.0
            K[k, :k] = 1.0
            rhs = np.zeros(k + 1)
            rhs[k] = 1.0
            sol = np.linalg.lstsq(K, rhs, rcond=None)[0]
            alpha = sol[:k]
            if np.all(alpha > tol):
                lam = alpha
                break
            mask = alpha <= tol
            theta = np.min(lam[mask] / (lam[mask] - alpha[mask]))
            lam = lam + theta * (alpha - lam)
            keep = lam > tol
            S = [s for s, kk in zip(S, keep) if kk]
            lam = lam[keep]
            lam = lam / lam.sum()
        x = lam @ X[S]
    w = np.zeros(T)
    w[S] = lam
    return x, w


def min_norm_point_sener_koltun_fw(points: np.ndarray, max_iter: int = 250, stop: float = 1e-5
                                   ) -> tuple[np.ndarray, np.ndarray]:
    """Sener & Koltun's MinNormSolver (``find_min_norm_element_FW``) on vectors: start at the best
    pair's 2-point solution (their Alg. 1), then Frank-Wolfe steps with the exact 2-point line
    search (Alg. 2), stopping when the change of the weights is below ``stop``."""
    X = points
    T = X.shape[0]
    dps = X @ X.T  # their cached dot products of the vectors

    def two(v1v1, v1v2, v2v2):
        if v1v2 >= v1v1:
            return 0.999, v1v1
        if v1v2 >= v2v2:
            return 0.001, v2v2
        gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
        return gamma, v2v2 + gamma * (v1v2 - v2v2)

    if T == 1:
        return X[0].copy(), np.ones(1)
    best = None
    for i in range(T):
        for j in range(i + 1, T):
            c, d = two(dps[i, i], dps[i, j], dps[j, j])
            if best is None or d < best[3]:
                best = (i, j, c, d)
    i, j, c, _ = best
    w = np.zeros(T)
    w[i], w[j] = c, 1 - c
    for _ in range(max_iter):
        t = int(np.argmin(dps @ w))
        v1v1 = w @ dps @ w
        v1v2 = w @ dps[:, t]
        v2v2 = dps[t, t]
        nc, _ = two(v1v1, v1v2, v2v2)
        new = nc * w
        new[t] += 1 - nc
        if np.abs(new - w).sum() < stop:
            break
        w = new
    return w @ X, w


def mgda_reference(J, normalization: str = "none", losses=None) -> np.ndarray:
    """MGDA's update: the min-norm point of the normalised gradients ``g_i / s_i`` (LibMTL's
    ``_gradient_normalizers``), exact (Wolfe). Returns ``d`` ``[P]``."""
    X = _np(J)
    norms = np.sqrt((X * X).sum(1))
    if normalization == "none":
        s = np.ones(len(X))
    elif normalization == "l2":
        s = norms
    elif normalization == "loss":
        s = _np(losses)
    elif normalization == "loss+":
        s = _np(losses) * norms
    else:
        raise ValueError(normalization)
    inv = np.where(s != 0, 1.0 / np.where(s != 0, s, 1.0), 0.0)
    d, _ = min_norm_point_wolfe(X * inv[:, None])
    return d


# ------------------------------------------------------------------------------------------ #
# CAGrad
# ------------------------------------------------------------------------------------------ #

def cagrad_reference(J, c: float = 0.4, rescale: int = 1, smooth: float = 0.0) -> np.ndarray:
    """CAGrad as the authors' code (Cranial-XIX/CAGrad ``cagrad``): scipy SLSQP on the simplex
    for ``min_x g0 . g_x + c ||g0|| ||g_x||`` with ``g_x = J^T x`` computed from the vectors,
    then ``d = g0 + c ||g0|| g_x / ||g_x||`` divided by ``1 + c^2`` (1), ``1 + c`` (2) or 1 (0).
    Their absolute ``+1e-8`` guards become ``delta^2 = (smooth max_i ||g_i||)^2`` inside the
    square roots (``smooth=0``: none); tolerances are tightened and the exact gradient is passed
    to SLSQP."""
    X = _np(J)
    T = X.shape[0]
    g0 = X.mean(0)
    k = c * np.linalg.norm(g0)
    # A whitened copy of the problem: scale so that max ||g_i|| = 1 (SLSQP's tolerances are
    # absolute); the optimal x is scale-invariant.
    sc = max(np.sqrt((X * X).sum(1).max()), 1e-300)
    Xs, g0s, ks = X / sc, g0 / sc, k / sc

    d2 = smooth ** 2  # in the scaled problem, max ||g_i|| = 1

    def f(x):
        gx = x @ Xs
        return g0s @ gx + ks * np.sqrt(gx @ gx + d2)

    def df(x):
        gx = x @ Xs
        n = np.sqrt(gx @ gx + d2)
        return Xs @ g0s + (ks / max(n, 1e-300)) * (Xs @ gx)

    x0 = np.ones(T) / T
    res = optimize.minimize(f, x0, jac=df, method="SLSQP", bounds=[(0.0, 1.0)] * T,
                            constraints=({"type": "eq", "fun": lambda x: 1 - x.sum(),
                                          "jac": lambda x: -np.ones_like(x)},),
                            options={"ftol": 1e-15, "maxiter": 2000})
    x = res.x
    gw = x @ X
    n = np.sqrt(gw @ gw + d2 * sc * sc)
    d = g0 + (k / n) * gw if n > 0 else g0.copy()
    return d / (1.0, 1.0 + c * c, 1.0 + c)[rescale]


# ------------------------------------------------------------------------------------------ #
# IMTL-G
# ------------------------------------------------------------------------------------------ #

def imtlg_reference(J, pinv: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """IMTL-G's closed form on the vectors (Liu et al. 2021, IMTL-G; LibMTL ``IMTL`` gradient
    part): ``u_i = g_i / ||g_i||``, ``D = g_1 - g_i``, ``U = u_1 - u_i`` (``i >= 2``),
    ``alpha_{2..T} = g_1 U^T (D U^T)^{-1}``, ``alpha_1 = 1 - sum``. ``pinv=True`` uses the
    pseudo-inverse of ``D U^T`` (duplicate tasks). Returns ``(d, alpha)``."""
    X = _np(J)
    T = X.shape[0]
    if T == 1:
        return X[0].copy(), np.ones(1)
    U_ = X / np.linalg.norm(X, axis=1, keepdims=True)
    D = X[0:1] - X[1:]
    U = U_[0:1] - U_[1:]
    M = D @ U.T
    a = X[0] @ U.T @ (np.linalg.pinv(M) if pinv else np.linalg.inv(M))
    alpha = np.concatenate([[1 - a.sum()], a])
    return alpha @ X, alpha


# ------------------------------------------------------------------------------------------ #
# Nash-MTL
# ------------------------------------------------------------------------------------------ #

def nashmtl_reference(J, max_norm: float = 1.0) -> tuple[np.ndarray, np.ndarray, float]:
    """Nash-MTL (Navon et al. 2022, Alg. 1): the positive ``alpha`` with ``alpha_i g_i . d = 1``,
    ``d = sum_j alpha_j g_j`` (i.e. ``G alpha = 1/alpha`` for the raw gradients, the authors'
    constraint ``alpha_i nf (G/nf alpha)_i >= 1``), found with scipy: L-BFGS-B on the convex
    ``1/2 ||J^T alpha||^2 - sum log alpha_i`` (in log-coordinates), polished by
    ``scipy.optimize.root`` on ``alpha_i (g_i . d) - 1 = 0``; then ``d`` clipped to
    ``max_norm``. Returns ``(d, alpha, residual)``."""
    X = _np(J)
    T = X.shape[0]
    sc = max(np.sqrt((X * X).sum(1).max()), 1e-300)
    Xs = X / sc                     # alpha(J / sc) = sc * alpha(J)

    def F(z):
        a = np.exp(z)
        d = a @ Xs
        return 0.5 * d @ d - z.sum(), (Xs @ d) * a - 1.0

    inv_n = 1.0 / np.linalg.norm(Xs, axis=1)
    q = np.linalg.norm(inv_n @ Xs) ** 2                 # start: alpha = c / n_i, best c
    z0 = np.log(inv_n) + 0.5 * np.log(T / max(q, 1e-300))
    res = optimize.minimize(F, z0, jac=True, method="L-BFGS-B",
                            options={"maxiter": 20_000, "gtol": 1e-12, "ftol": 1e-15})

    def eqs(z):
        a = np.exp(z)
        return a * (Xs @ (a @ Xs)) - 1.0

    root = optimize.root(eqs, res.x, method="hybr", options={"xtol": 1e-14})
    z = root.x if np.abs(eqs(root.x)).max() < np.abs(eqs(res.x)).max() else res.x
    alpha = np.exp(z) / sc
    resid = float(np.abs(eqs(z)).max())
    d = alpha @ X
    n = np.linalg.norm(d)
    if max_norm > 0 and n > max_norm:
        alpha = alpha * (max_norm / n)
        d = alpha @ X
    return d, alpha, resid


# ------------------------------------------------------------------------------------------ #
# Aligned-MTL
# ------------------------------------------------------------------------------------------ #

def alignedmtl_reference(J, scale_mode: str = "min") -> np.ndarray:
    """Aligned-MTL (Senushkin et al. 2023, Alg. 1) on the vectors: the SVD ``J = U S W^T``
    gives ``G = U S^2 U^T``; with the rank cut ``S^2 > T eps_64 max S^2`` the aligned
    gradients are ``B J = sqrt(l_s) U W^T`` (orthogonal, equal norms) and the update is their
    sum ``d = sqrt(l_s) W U^T 1`` (LibMTL's ``alpha = B.sum(0)``)."""
    X = _np(J)
    T = X.shape[0]
    U, S, Wt = np.linalg.svd(X, full_matrices=False)
    lam = S ** 2
    keep = lam > lam.max() * T * np.finfo(np.float64).eps if lam.size else lam > 0
    if not keep.any():
        return X.sum(0)
    lk = lam[keep]
    ls = {"min": lk.min(), "median": np.sort(lk)[(len(lk) - 1) // 2], "rmse": lk.mean()}[scale_mode]
    return np.sqrt(ls) * (Wt[keep].T @ (U[:, keep].T @ np.ones(T)))


def gradvac_reference(J, offsets, perms, targets, beta, eps=1e-8):
    """GradVac (Wang et al., ICLR 2021, Alg. 1) on vectors, per layer, LibMTL's loop order
    (torch tensors in, ``(d [P], new targets)`` out)."""
    import torch
    T = J.shape[0]
    out = torch.zeros(J.shape[1], dtype=J.dtype)
    tgt = targets.clone()
    for l, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        gl = J[:, a:b]
        for i in range(T):
            gi = gl[i].clone()
            for j in perms[i].tolist():
                if j == i:
                    continue
                gj = gl[j]
                # gradops' guards: cosines clamped to [-1, 1], 1 - ph^2 floored at the dtype's eps
                phi = torch.clamp(torch.dot(gi, gj) / (gi.norm() * gj.norm() + eps), -1.0, 1.0)
                ph = min(max(float(tgt[l, i, j]), -1.0), 1.0)
                if phi < ph:
                    root_t = math.sqrt(max(1 - ph ** 2, torch.finfo(J.dtype).eps))
                    coef = gi.norm() * (ph * math.sqrt(1 - phi ** 2) - phi * root_t) \
                        / (gj.norm() * root_t + eps)
                    gi = gi + coef * gj
                tgt[l, i, j] = (1 - beta) * ph + beta * phi
            out[a:b] += gi
    return out, tgt
