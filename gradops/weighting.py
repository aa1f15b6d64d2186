"""Gram-weighted multi-task methods as plain functions ``G -> w`` (SPEC.md §0 shape 1, §4).

Every function takes the Gram ``G = J J^T`` (``[T, T]``, any float dtype, any device) and returns
weights ``w`` (``[T]``, on ``G``'s device) such that the method's update is ``d = w^T J`` (the sum
convention: ``d = sum_i w_i g_i``, ``g_i`` the raw task gradients, row ``i`` of ``J``), to be
applied with :func:`gradops.combine`. The math runs in float32 (float64 when ``G`` is float64) and
the weights come back in that dtype.

No host synchronisation: there is no ``.item()``, no ``.cpu()`` and no Python branch on a tensor
value. Iterative solvers run a fixed number of iterations (``max_iter``, a Python int); their
tolerance only freezes the iterate on the device once it is reached (``torch.where``). Every
function traces under ``torch.compile(fullgraph=True)``.

``return_status=True`` returns ``(w, status)`` with a :class:`SolverStatus` of 0-dim device
tensors. An iterative solver that does not reach its tolerance within ``max_iter`` still returns
its best (last) iterate, and ``status.converged`` is False: nothing falls back silently; the caller
(``MTLOptimizer``) counts and warns. Closed forms report ``converged = all(isfinite(w))``.

Conventions (each function's docstring has the details):

    method      weights (d = w^T J)                         under J -> sJ
    ----------  ------------------------------------------  ---------------------------------
    ew          1 (sum) or 1/T (mean)                       w same, d -> s d
    mgda        min-norm point of the (normalised) hull     none: w same, d -> s d; l2: d same
    cagrad      (1/T + lam w*) / (1 + c^2)  (LibMTL scale)  w same, d -> s d
    imtlg       G^+ n / (1^T G^+ n), n_i = ||g_i||          w same, d -> s d
    nashmtl     G a = 1/a, then ||d|| <= max_norm (1.0)     a -> a / s, d same (before clip)
    alignedmtl  B 1, B = sqrt(l_min) V diag(l)^-1/2 V^T     w same, d -> s d
    pcgrad      gradops.pcgrad_weights (fp32)               w same, d -> s d

All are permutation-equivariant (permuting the tasks permutes ``w``) wherever their solution is
unique; PCGrad with explicit ``perms`` transforms with the orders.

Iteration budgets: ``mgda``, ``cagrad`` and ``nashmtl`` run at most ``max_iter`` iterations, and a
converged iterate is frozen (``torch.where``), so the result never depends on how many iterations
are left. On a GPU (and under ``torch.compile``) the loop always runs the full budget: deciding to
stop would need a host read. On CPU tensors in eager mode, where reading a value costs nothing,
the loop stops as soon as it has converged (``early_exit=None``, the default; ``False`` forces the
full budget, ``True`` forces the check).

Solver backends (op ``weighting_solvers`` in :func:`gradops.info`): in eager mode the loops of
``mgda``, ``cagrad`` and ``nashmtl`` run in C++ on CPU tensors (``csrc/weighting_cpu.cpp``, when
the extension is built: the same algorithms step for step, in double precision) and in one Triton
program per solve on CUDA tensors with ``T <= 64`` (:mod:`gradops._solver_kernels`, in ``G``'s
dtype: one launch instead of ~30 per iteration), on the ``T x T`` inputs prepared here, stopping
on the device once converged (whatever ``early_exit`` says: the result is the same). The torch
loops below are the reference and serve ``torch.compile``, fake tensors, ``T > 64`` on CUDA and
a ``G`` that requires grad; ``gradops.use_backend("torch")`` (or ``GRADOPS_BACKEND=torch``)
forces them, ``use_backend("cpp")`` / ``use_backend("triton")`` force the others (an error
where they cannot run; Triton on CPU tensors needs ``TRITON_INTERPRET=1``).

Linear algebra on CUDA: ``imtlg`` and ``alignedmtl`` call ``torch.linalg.eigh``, and ``nashmtl``
``torch.linalg.cholesky_ex``; the ``_ex`` form never checks its ``info`` on the host, but PyTorch's
``eigh`` checks convergence and may synchronise with the device on CUDA (a ``T x T`` call).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from . import _backend, _solver_kernels
from ._backend import _C, register_op, select_backend
from ._validate import _is_fake
from .ops.pcgrad import pcgrad_weights

__all__ = ["METHODS", "SolverStatus", "alignedmtl", "cagrad", "ew", "get", "imtlg", "mgda",
           "nashmtl", "pcgrad"]


class SolverStatus(NamedTuple):
    """What a solver reports, as 0-dim tensors on ``G``'s device (reading them syncs; the
    solver never does).

    Attributes:
        converged: bool: the tolerance was reached within ``max_iter`` (closed forms: the weights
            are finite).
        iterations: int64: iterations taken before the iterate froze (``max_iter`` when it never
            converged; 0 for closed forms).
        residual: the solver's dimensionless optimality measure at the returned weights (see each
            method; 0 for closed forms with finite weights, NaN otherwise).
    """

    converged: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor


# --------------------------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------------------------- #

def _prep(G: torch.Tensor, name: str) -> torch.Tensor:
    """Check ``G`` and return it symmetrised in the working dtype (fp64 for fp64, else fp32)."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"gradops.weighting.{name}: G must be a torch.Tensor, "
                        f"got {type(G).__name__}")
    if G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] < 1:
        raise ValueError(f"gradops.weighting.{name}: G must be a square Gram [T, T] with T >= 1, "
                         f"got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"gradops.weighting.{name}: G must be floating point, got {G.dtype}")
    dt = torch.float64 if G.dtype == torch.float64 else torch.float32
    G = G.to(dt)
    return 0.5 * (G + G.T)


def _check_iter(name: str, max_iter, tol) -> None:
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 0:
        raise ValueError(f"gradops.weighting.{name}: max_iter must be a Python int >= 0, "
                         f"got {max_iter!r}")
    if not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"gradops.weighting.{name}: tol must be a float >= 0, got {tol!r}")


def _tiny(G: torch.Tensor) -> float:
    return torch.finfo(G.dtype).tiny


def _eps(G: torch.Tensor) -> float:
    return torch.finfo(G.dtype).eps


def _poison(G: torch.Tensor) -> torch.Tensor:
    """0, or NaN when ``G`` has a NaN/Inf: added to the weights so that a broken Gram never
    yields finite weights (the status then also says not converged)."""
    return torch.where(torch.isfinite(G).all(), torch.zeros((), dtype=G.dtype, device=G.device),
                       torch.full((), math.nan, dtype=G.dtype, device=G.device))


def _closed_status(w: torch.Tensor) -> SolverStatus:
    ok = torch.isfinite(w).all()
    return SolverStatus(ok, torch.zeros((), dtype=torch.int64, device=w.device),
                        torch.where(ok, torch.zeros((), dtype=w.dtype, device=w.device),
                                    torch.full((), math.nan, dtype=w.dtype, device=w.device)))


def _stop_early(done: torch.Tensor, early_exit: bool | None) -> bool:
    """Whether an iterative solver may leave its loop now: only when ``early_exit`` (default:
    for CPU tensors in eager mode, where reading ``done`` costs no device synchronisation) and the
    iterate has converged. The iterate is frozen once converged, so stopping early returns exactly
    what the full budget would."""
    if early_exit is None:
        early_exit = done.device.type == "cpu" and not torch.compiler.is_compiling()
    return bool(early_exit) and bool(done)


def _ret(w, status, return_status):
    return (w, status) if return_status else w


register_op("weighting_solvers", ("triton", "cpp", "torch"), max_t={"triton": _solver_kernels.MAX_T})


def _solver_backend(G: torch.Tensor) -> str:
    """Where an iterative solver's loop runs on ``G``: ``"triton"`` (one program per solve,
    :mod:`gradops._solver_kernels`; CUDA tensors with ``T <= 64``, or CPU tensors under
    ``TRITON_INTERPRET=1`` when forced), ``"cpp"`` (``csrc/weighting_cpu.cpp``, CPU tensors) or
    ``"torch"`` (the reference loops here).

    Always torch under ``torch.compile`` (the kernel calls are opaque to tracing) and for fake
    tensors. Otherwise :func:`gradops._backend.select_backend` decides (CUDA: Triton, else torch;
    CPU: C++, else torch), and a forced backend applies. A ``G`` that requires grad (with grad
    mode on) keeps the differentiable torch loop; forcing another backend for it raises.
    """
    if torch.compiler.is_compiling() or _is_fake(G):
        return "torch"
    backend = select_backend("weighting_solvers", G.device, G.shape[0])
    if backend != "torch" and G.requires_grad and torch.is_grad_enabled():
        if _backend.forced_backend() == backend:
            raise RuntimeError(f"gradops.weighting_solvers: forced backend {backend!r} cannot run "
                               "this call: G requires grad and only the torch solvers are "
                               "differentiable")
        return "torch"
    return backend


def _pairwise_fw(G: torch.Tensor, max_iter: int, tol: float, scale: torch.Tensor,
                 b: torch.Tensor | None = None, k: torch.Tensor | None = None,
                 delta2: torch.Tensor | None = None, early_exit: bool | None = None
                 ) -> tuple[torch.Tensor, SolverStatus]:
    """Pairwise Frank-Wolfe on the simplex, exact line search, fixed budget, all on device.

    Minimises ``f(w) = w^T G w`` (``b is None``: MGDA) or
    ``f(w) = b^T w + k sqrt(w^T G w + delta2)`` (CAGrad, smoothed). Each step moves mass
    ``gamma`` from the away vertex ``v`` (the support's largest partial derivative) to the
    Frank-Wolfe vertex ``s`` (the smallest), ``gamma`` in ``[0, w_v]`` minimising ``f`` exactly
    along ``e_s - e_v`` (closed forms below). Pairwise FW converges linearly on a polytope
    (Lacoste-Julien & Jaggi 2015), unlike plain FW's ``O(1/k)``; from ``w = 1/T`` it is
    symmetric in the tasks.

    The residual is the Frank-Wolfe duality gap ``grad . (w - e_s) >= f(w) - f*`` divided by
    ``scale`` (``max_i G_ii``): dimensionless, and for MGDA ``||d - d*||^2 <= residual * scale``
    (``d = J^T w``, ``d*`` the unique min-norm point): it bounds the error of the update itself.

    Outside the reference torch loop below (see :func:`_solver_backend`), on CPU the loop runs
    in C++ (``_C.pairwise_fw_cpu``: this algorithm in double precision) and on CUDA in one
    Triton program (:func:`gradops._solver_kernels.pairwise_fw_triton`), both stopping once
    converged.
    """
    backend = _solver_backend(G)
    if backend != "torch":
        fn = _C.pairwise_fw_cpu if backend == "cpp" else _solver_kernels.pairwise_fw_triton
        w, converged, its, gap = fn(G, b, scale, k, delta2, max_iter, float(tol), _tiny(G))
        return w, SolverStatus(converged, its, gap)
    T = G.shape[0]
    dt, dev = G.dtype, G.device
    idx = torch.arange(T, device=dev)
    tiny = _tiny(G)
    w = torch.full((T,), 1.0 / T, dtype=dt, device=dev)
    its = torch.zeros((), dtype=torch.int64, device=dev)
    inf = torch.full((), math.inf, dtype=dt, device=dev)

    def grad_of(w, Gw):
        if b is None:
            return 2.0 * Gw
        return b + k * Gw / torch.sqrt(torch.clamp(w @ Gw, min=0.0) + delta2)

    def gap_of(w, Gw):
        gr = grad_of(w, Gw)
        return gr, (gr @ w - gr.min()) / scale

    for _ in range(max_iter):
        Gw = G @ w                           # fresh each step: the gap stays a true certificate
        gr, gap = gap_of(w, Gw)
        done = gap <= tol
        if _stop_early(done, early_exit):
            break
        s = torch.argmin(gr)
        v = torch.argmax(torch.where(w > 0, gr, -inf))
        delta = (idx == s).to(dt) - (idx == v).to(dt)
        wv = (w * (idx == v).to(dt)).sum()
        Gd = G @ delta
        A = delta @ Gd                       # curvature d^T G d >= 0
        B = w @ Gd                           # (G w)_s - (G w)_v
        if b is None:                        # quadratic: gamma* = -B / A
            gamma = -B / torch.clamp(A, min=tiny)
        else:                                # a gamma + k sqrt(A gamma^2 + 2 B gamma + C)
            a = b @ delta
            C = torch.clamp(w @ Gw, min=0.0) + delta2
            Ac = torch.clamp(A, min=tiny)
            r = (a / torch.clamp(k, min=tiny)) ** 2
            Dq = torch.clamp(C - B * B / Ac, min=0.0)
            interior = (A > r) & (k > 0)
            u = torch.sqrt(r * Dq / torch.clamp(Ac * (A - r), min=tiny))
            u = torch.where(a > 0, -u, u)    # sign(u) = -sign(a) at the stationary point
            g_int = u - B / Ac
            g_mono = torch.where(a < 0, inf, torch.zeros_like(a))  # f monotone in gamma
            gamma = torch.where(interior, g_int, g_mono)
        gamma = torch.where(torch.isnan(gamma), torch.zeros_like(gamma), gamma)
        gamma = torch.minimum(torch.clamp(gamma, min=0.0), wv)
        w_new = w + gamma * delta
        w_new = torch.where(idx == v, torch.clamp(w_new, min=0.0), w_new)  # exact drop
        w = torch.where(done, w, w_new)
        its = its + (~done).to(torch.int64)
    Gw = G @ w
    _, gap = gap_of(w, Gw)
    return w, SolverStatus(gap <= tol, its, gap)


# --------------------------------------------------------------------------------------------- #
# methods
# --------------------------------------------------------------------------------------------- #

def ew(G: torch.Tensor, reduction: str = "sum", *, return_status: bool = False):
    """Equal weighting ("Joint Train", SPEC §4): ``w = 1`` (``reduction="sum"``, the sum of the
    losses) or ``w = 1/T`` (``"mean"``, the ST paper's average loss). ``G`` only gives ``T``,
    the device and the dtype."""
    G = _prep(G, "ew")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"gradops.weighting.ew: reduction must be 'sum' or 'mean', "
                         f"got {reduction!r}")
    T = G.shape[0]
    w = torch.full((T,), 1.0 if reduction == "sum" else 1.0 / T, dtype=G.dtype, device=G.device)
    w = w + _poison(G)                       # NaN/Inf in G propagate, as in every other method
    return _ret(w, _closed_status(w), return_status)


MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def mgda(G: torch.Tensor, normalization: str = "none", losses: torch.Tensor | None = None,
         max_iter: int = 250, tol: float = 1e-5, *, early_exit: bool | None = None,
         return_status: bool = False):
    """MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    Alg. 2): the min-norm point of the convex hull of the (normalised) task gradients,
    ``w* = argmin_{w in simplex} w^T Gn w``, ``Gn_ij = G_ij / (s_i s_j)``.

    Normalisation ``s_i`` (their Sec. 3.2 and LibMTL's ``mgda_gn``): ``"none"`` (1), ``"l2"``
    (``||g_i|| = sqrt(G_ii)``), ``"loss"`` (``losses[i]``), ``"loss+"`` (``losses[i] ||g_i||``).
    LibMTL applies ``w*`` to the normalised gradients ``g_i / s_i``; this function returns the
    weights **on the raw gradients**, ``w_i = w*_i / s_i``, so ``d = w^T J`` is the same update
    (``w_i = 0`` where ``s_i = 0``: a zero gradient makes the min-norm point 0 anyway).

    Solver: pairwise Frank-Wolfe with the exact line search of their Alg. 2 (the 2-vector
    min-norm step of their Alg. 1 along ``e_s - e_v``), from ``w = 1/T``, at most ``max_iter``
    iterations (LibMTL's 250). ``T = 2`` is solved exactly in one step. Residual = Frank-Wolfe
    gap / ``max_i Gn_ii`` (``||d - d*||^2 <= residual * max_i Gn_ii`` in the normalised space);
    ``converged`` when it is ``<= tol``.

    Scale: with ``"none"`` the weights are invariant to ``J -> sJ`` and ``d`` scales by ``s``;
    with ``"l2"``, ``d`` is invariant to scaling any task's gradient by ``c_i > 0``. ``d`` is
    unique; ``w`` is unique when the gradients are affinely independent.
    """
    G = _prep(G, "mgda")
    _check_iter("mgda", max_iter, tol)
    if normalization not in MGDA_NORMALIZATIONS:
        raise ValueError(f"gradops.weighting.mgda: normalization must be one of "
                         f"{MGDA_NORMALIZATIONS}, got {normalization!r}")
    T = G.shape[0]
    norms = torch.sqrt(torch.clamp(G.diagonal(), min=0.0))
    if normalization in ("loss", "loss+"):
        if not isinstance(losses, torch.Tensor) or losses.shape != (T,):
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else repr(losses)
            raise ValueError(f"gradops.weighting.mgda: normalization={normalization!r} needs "
                             f"losses, a tensor [T] = [{T}], got {got}")
        losses = losses.detach().to(device=G.device, dtype=G.dtype)
    if normalization == "none":
        s = torch.ones(T, dtype=G.dtype, device=G.device)
    elif normalization == "l2":
        s = norms
    elif normalization == "loss":
        s = losses
    else:
        s = losses * norms
    inv = torch.where(s != 0, 1.0 / torch.where(s != 0, s, torch.ones_like(s)),
                      torch.zeros_like(s))
    Gn = G * inv[:, None] * inv[None, :]
    scale = torch.clamp(Gn.diagonal().max(), min=_tiny(G))
    w, status = _pairwise_fw(Gn, max_iter, tol, scale, early_exit=early_exit)
    return _ret(w * inv + _poison(G), status, return_status)


def cagrad(G: torch.Tensor, c: float = 0.4, rescale: int = 1, max_iter: int = 250,
           tol: float = 1e-6, smooth: float | None = None, *, early_exit: bool | None = None,
           return_status: bool = False):
    """CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, Alg. 1, solved in its dual form over the simplex): with ``g0 = mean_i g_i``,
    ``w* = argmin_{w in simplex} w^T G 1/T + c ||g0|| sqrt(w^T G w)`` and
    ``d = g0 + (c ||g0|| / ||g_w||) g_w``, ``g_w = J^T w*``, then divided by ``1 + c^2``
    (``rescale=1``, default), ``1 + c`` (``2``) or nothing (``0``), as in the authors' code.

    Scale convention = LibMTL's and the authors' (``g0`` the **mean** gradient):
    ``w = (1/T + lam w*) / r``, ``lam = c ||g0|| / ||g_w||``, ``r`` the rescale divisor; so
    ``c = 0`` gives the mean (``rescale`` 0/1) and TorchJD's ``CAGrad(c)`` equals ``rescale=0``.
    All quantities come from ``G`` (``||g0||^2 = 1^T G 1 / T^2``, ``||g_w||^2 = w^T G w``).
    Weights are invariant to ``J -> sJ``; ``d`` scales by ``s``.

    Smoothing: ``||g_w||`` is replaced by ``sqrt(||g_w||^2 + delta^2)`` in the objective and in
    ``lam``, ``delta = smooth * max_i ||g_i||`` (default ``smooth = sqrt(eps)`` of the working
    dtype: 3.5e-4 in fp32, 1.5e-8 in fp64), the scale-free form of the authors' and LibMTL's
    ``sqrt(. + 1e-8)`` and ``+ 1e-8``. It changes nothing measurable unless ``g_w`` nearly
    vanishes at the optimum (``0`` in the hull of the gradients with mild conflict, e.g. a zero
    task gradient or two opposite ones); there the unsmoothed problem is not differentiable and
    its ``d`` not unique (LibMTL's absolute ``1e-8`` then picks an arbitrary one), while the
    smoothed problem is differentiable and picks one ``d`` continuously, with bounded weights
    (``lam <= c ||g0|| / delta``) and ``||d - g0|| <= c ||g0||`` before the rescale. A zero task
    gradient then gives ``d = g0``. In fp32 the residual of such a problem may stay above
    ``tol`` (the curvature is ``~ 1/delta``): the status says so.

    Solver: pairwise Frank-Wolfe with an exact (closed-form) line search of the convex objective,
    from ``w = 1/T``, ``max_iter`` iterations (the authors use scipy SLSQP on the CPU). Residual =
    Frank-Wolfe gap / ``max_i G_ii``; ``converged`` when ``<= tol``. ``c = 0`` needs no solve.
    """
    G = _prep(G, "cagrad")
    _check_iter("cagrad", max_iter, tol)
    if not isinstance(c, (int, float)) or not c >= 0:
        raise ValueError(f"gradops.weighting.cagrad: c must be a float >= 0, got {c!r}")
    if rescale not in (0, 1, 2):
        raise ValueError(f"gradops.weighting.cagrad: rescale must be 0, 1 or 2, got {rescale!r}")
    T = G.shape[0]
    b = G.sum(1) / T                                          # G 1 / T = J g0
    g0_norm = torch.sqrt(torch.clamp(b.sum() / T, min=0.0))   # ||g0||^2 = 1^T G 1 / T^2
    k = c * g0_norm
    if smooth is None:
        smooth = math.sqrt(_eps(G))
    if not isinstance(smooth, (int, float)) or not smooth >= 0:
        raise ValueError(f"gradops.weighting.cagrad: smooth must be a float >= 0, got {smooth!r}")
    scale = torch.clamp(G.diagonal().max(), min=_tiny(G))
    delta2 = (smooth * smooth) * scale + _tiny(G)
    if c == 0:
        w_star = torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)
        status = SolverStatus(torch.ones((), dtype=torch.bool, device=G.device),
                              torch.zeros((), dtype=torch.int64, device=G.device),
                              torch.zeros((), dtype=G.dtype, device=G.device))
    else:
        w_star, status = _pairwise_fw(G, max_iter, tol, scale, b=b, k=k, delta2=delta2,
                                      early_exit=early_exit)
    lam = k / torch.sqrt(torch.clamp(w_star @ G @ w_star, min=0.0) + delta2)
    w = 1.0 / T + lam * w_star
    w = w / (1.0, 1.0 + c * c, 1.0 + c)[rescale] + _poison(G)
    status = status._replace(converged=status.converged & torch.isfinite(w).all())
    return _ret(w, status, return_status)


def _eigh_psd(G: torch.Tensor, rcond: float | None):
    """``G = V diag(l) V^T`` (ascending ``l``), the mask of eigenvalues above the rank cut
    ``rcond * max(l)`` (default ``rcond = T eps``, LibMTL's and TorchJD's tolerance), and a 0-dim
    NaN-or-0 to add to the result: a non-finite ``G`` is replaced by 0 before ``eigh`` (which
    would raise) and the result made NaN, as every op propagates NaN/Inf."""
    if rcond is not None and (not isinstance(rcond, (int, float)) or not rcond >= 0):
        raise ValueError(f"gradops.weighting: rcond must be a float >= 0 or None, got {rcond!r}")
    finite = torch.isfinite(G).all()
    l, V = torch.linalg.eigh(torch.where(finite, G, torch.zeros_like(G)))
    T = G.shape[0]
    rc = T * _eps(G) if rcond is None else rcond
    keep = (l > rc * torch.clamp(l.max(), min=0.0)) & (l > 0)
    return l, V, keep, _poison(G)


def imtlg(G: torch.Tensor, ridge: float = 0.0, rcond: float | None = None, *,
          return_status: bool = False):
    """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, the gradient
    balance part, IMTL-G):
    the update ``d = sum_i alpha_i g_i`` with ``sum_i alpha_i = 1`` has equal projections onto
    every unit gradient ``u_i = g_i / ||g_i||``.

    Closed form from ``G`` only. The paper's form ``alpha_{2..T} = g_1 U^T (D U^T)^{-1}``
    (``D = g_1 - g_i``, ``U = u_1 - u_i``) is the solution of ``d . u_i = d . u_1``; since
    ``d . u_i = (G alpha)_i / n_i`` (``n_i = sqrt(G_ii)``) that condition reads
    ``G alpha = lambda n``, hence ``alpha = G^{-1} n / (1^T G^{-1} n)`` — the same weights when
    ``G`` is invertible, symmetric in the tasks, and with ``G^{-1}`` replaced by the
    pseudo-inverse (``torch.linalg.eigh``, eigenvalues ``<= rcond * l_max`` cut, default
    ``rcond = T eps``) when it is not: TorchJD's generalisation (Quinton & Rey, "Jacobian
    Descent"). Duplicate tasks then share their weight, and a zero gradient gets weight 0 while the
    others get the IMTL-G weights of the remaining tasks. For a ``J`` of rank ``< T`` whose
    ``n`` is not in the range of ``G`` this is the least-squares compromise (the paper's exact
    condition would force ``d = 0`` there). ``ridge > 0`` uses ``1 / (l + ridge * l_max)``
    instead of ``1 / l`` on the kept eigenvalues (Tikhonov damping of near-singular systems).

    ``T = 1`` gives ``[1]``. If ``|1^T G^+ n|`` vanishes (``<= eps / max_i n_i``), ``w = 0``
    (TorchJD's choice). Weights are invariant to ``J -> sJ``; ``d`` scales by ``s``.
    """
    G = _prep(G, "imtlg")
    if not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise ValueError(f"gradops.weighting.imtlg: ridge must be a float >= 0, got {ridge!r}")
    T = G.shape[0]
    if T == 1:
        w = torch.ones(1, dtype=G.dtype, device=G.device) + 0.0 * G[0]
        return _ret(w, _closed_status(w), return_status)
    n = torch.sqrt(torch.clamp(G.diagonal(), min=0.0))
    l, V, keep, poison = _eigh_psd(G, rcond)
    lmax = torch.clamp(l.max(), min=0.0)
    inv = torch.where(keep, 1.0 / torch.where(keep, l + ridge * lmax, torch.ones_like(l)),
                      torch.zeros_like(l))
    v = V @ (inv * (V.T @ n))
    v = torch.where(n > _eps(G) * n.max(), v, torch.zeros_like(v))   # zero gradients: exactly 0
    s = v.sum()
    ok = s.abs() * n.max() > _eps(G)
    w = torch.where(ok, v / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(v))
    w = w + poison                          # NaN / Inf in G propagate
    return _ret(w, _closed_status(w), return_status)


def nashmtl(G: torch.Tensor, max_norm: float = 1.0, max_iter: int = 20, tol: float = 1e-5, *,
            early_exit: bool | None = None, return_status: bool = False):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Alg. 1
    and its optimality condition): the positive ``alpha`` with ``G alpha = 1 / alpha``
    (elementwise), the Nash bargaining solution; ``d = sum_i alpha_i g_i``, then clipped to
    ``||d|| <= max_norm`` (``||d|| = sqrt(alpha^T G alpha)``; ``max_norm = 0`` disables) with the
    clip folded into the weights, as LibMTL's and the authors' ``clip_grad_norm_(shared,
    max_norm)``.

    Convention: the equation is solved for the **raw** ``G``. The authors' code (and LibMTL's,
    TorchJD's copy) divides ``G`` by its Frobenius norm ``nf`` for the solver but keeps ``nf`` in
    the constraint ``alpha_i nf (G/nf alpha)_i >= 1``, i.e. ``alpha_i (G alpha)_i >= 1``, so its
    fixed point is this one; it stops its CCP after 20 cvxpy solves, we solve to ``tol``. Here
    ``G`` is divided by ``mean_i G_ii`` internally for conditioning only (``alpha(G/m) =
    sqrt(m) alpha(G)``). At the solution ``||d||^2 = alpha^T G alpha = T``: ``alpha`` scales as
    ``1/s`` under ``J -> sJ`` and ``d`` is invariant (before the clip, which with the default
    ``max_norm = 1`` and ``T >= 2`` is always active: ``||d|| = 1``).

    Solver: Newton's method on the strictly convex ``F(alpha) = 1/2 alpha^T G alpha - sum log
    alpha_i`` (its stationary point is the solution), damped as for a self-concordant function
    (step ``1/(1 + lambda)`` while the Newton decrement ``lambda >= 1/4``; this keeps ``alpha >
    0``), Cholesky (``cholesky_ex``, never checked on the host) on ``G + diag(1/alpha^2)`` plus
    a ``16 eps`` relative jitter (changes the step, not the fixed point), from
    ``alpha_i = c / n_i``, ``max_iter`` iterations. Residual = ``max_i |alpha_i (G alpha)_i - 1|`` (dimensionless);
    ``converged`` when ``<= tol``. Tasks with a zero gradient (``G_ii <= eps^2 max G_ii``) get
    weight 0 and the others are solved without them. When ``0`` is in the convex hull of the non-zero
    gradients (typically when ``T > P``), ``F`` is unbounded below and there is no solution: the
    status then says not converged and ``w`` is the last iterate (clipped).
    """
    G = _prep(G, "nashmtl")
    _check_iter("nashmtl", max_iter, tol)
    if not isinstance(max_norm, (int, float)) or not max_norm >= 0:
        raise ValueError(f"gradops.weighting.nashmtl: max_norm must be a float >= 0, "
                         f"got {max_norm!r}")
    dt = G.dtype
    eps, tiny = _eps(G), _tiny(G)
    diag = torch.clamp(G.diagonal(), min=0.0)
    dmax = diag.max()
    active = diag > eps * eps * dmax
    m = torch.clamp(torch.where(active, diag, torch.zeros_like(diag)).sum()
                    / torch.clamp(active.sum(), min=1), min=tiny)
    act2 = active[:, None] & active[None, :]
    Gn = torch.where(act2, G / m, torch.zeros_like(G)) + torch.diag((~active).to(dt))
    a, its, res = _nash_newton(Gn, max_iter, tol, early_exit)
    alpha = torch.where(active, a / torch.sqrt(m), torch.zeros_like(a))
    if max_norm > 0:
        dnorm = torch.sqrt(torch.clamp(alpha @ G @ alpha, min=0.0))
        alpha = alpha * torch.clamp(max_norm / torch.clamp(dnorm, min=tiny), max=1.0)
    alpha = alpha + _poison(G)
    status = SolverStatus((res <= tol) & torch.isfinite(alpha).all(), its, res)
    return _ret(alpha, status, return_status)


def _nash_newton(Gn: torch.Tensor, max_iter: int, tol: float, early_exit: bool | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nash-MTL's damped Newton loop on the normalised Gram ``Gn`` (see :func:`nashmtl`):
    ``(a, iterations, residual)``, ``residual = max_i |a_i (Gn a)_i - 1|``.

    Outside the reference torch loop (see :func:`_solver_backend`), it runs in C++ on CPU
    (``_C.nash_newton_cpu``, double precision) and in one Triton program on CUDA
    (:func:`gradops._solver_kernels.nash_newton_triton`), both stopping once converged.
    """
    T = Gn.shape[0]
    dt, dev = Gn.dtype, Gn.device
    eps, tiny = _eps(Gn), _tiny(Gn)
    jitter = 16 * eps
    backend = _solver_backend(Gn)
    if backend != "torch":
        fn = _C.nash_newton_cpu if backend == "cpp" else _solver_kernels.nash_newton_triton
        a, _, its, res = fn(Gn, max_iter, float(tol), tiny, jitter)
        return a, its, res
    eye = torch.eye(T, dtype=dt, device=dev)

    def residual(a, Ga):
        return (a * Ga - 1.0).abs().max()

    a = 1.0 / torch.sqrt(torch.clamp(Gn.diagonal(), min=tiny))
    q = a @ Gn @ a
    a = a * torch.sqrt(T / torch.clamp(q, min=tiny))
    its = torch.zeros((), dtype=torch.int64, device=dev)
    for _ in range(max_iter):
        Ga = Gn @ a
        done = residual(a, Ga) <= tol
        if _stop_early(done, early_exit):
            break
        grad = Ga - 1.0 / a
        H = Gn + torch.diag(1.0 / (a * a)) + jitter * eye
        L, _info = torch.linalg.cholesky_ex(H)
        step = torch.cholesky_solve(-grad[:, None], L)[:, 0]
        lam = torch.sqrt(torch.clamp(-(grad @ step), min=0.0))
        t = torch.where(lam < 0.25, torch.ones_like(lam), 1.0 / (1.0 + lam))
        a_new = a + t * step
        a_new = torch.where(a_new > 0, a_new, 0.5 * a)       # rounding guard (theory: > 0)
        a = torch.where(done, a, a_new)
        its = its + (~done).to(torch.int64)
    return a, its, residual(a, Gn @ a)


ALIGNED_SCALE_MODES = ("min", "median", "rmse")


def alignedmtl(G: torch.Tensor, scale_mode: str = "min", rcond: float | None = None, *,
               return_status: bool = False):
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023, Alg. 1): with ``G = V diag(l) V^T`` (``torch.linalg.eigh``,
    not the removed ``symeig``) and the rank cut ``l > T eps l_max`` (``rcond``), the balance
    transformation ``B = sqrt(l_s) V diag(l)^(-1/2) V^T`` on the kept eigenpairs makes the
    transformed gradients ``B J`` orthogonal with equal norms ``sqrt(l_s)``
    (``B G B = l_s * projector onto range(G)``); the update is ``d = (B J)^T 1``: ``w = B 1``.

    ``scale_mode`` picks ``l_s``: ``"min"`` (the smallest kept eigenvalue, the paper's and
    LibMTL's), ``"median"`` (lower median of the kept ones), ``"rmse"`` (their mean; the authors'
    code's name). Scale convention = LibMTL's (``alpha = B.sum(0)``, task weights 1);
    TorchJD's ``AlignedMTL`` uses the mean preference vector: its weights are ours ``/ T``. The
    rank cut uses the working dtype's eps (fp32 or fp64; LibMTL always fp32's). Rank 0 (``G = 0``)
    gives ``B = I`` (TorchJD). Weights are invariant to ``J -> sJ``; ``d`` scales by ``s``.
    """
    G = _prep(G, "alignedmtl")
    if scale_mode not in ALIGNED_SCALE_MODES:
        raise ValueError(f"gradops.weighting.alignedmtl: scale_mode must be one of "
                         f"{ALIGNED_SCALE_MODES}, got {scale_mode!r}")
    T = G.shape[0]
    l, V, keep, poison = _eigh_psd(G, rcond)   # l ascending: the kept ones are the last r
    r = keep.sum()
    safe = torch.where(keep, l, torch.ones_like(l))
    if scale_mode == "min":
        ls = torch.where(keep, l, torch.full_like(l, math.inf)).min()
    elif scale_mode == "median":
        pos = torch.clamp(T - r + torch.div(r - 1, 2, rounding_mode="floor"), 0, T - 1)
        ls = torch.gather(l, 0, pos.reshape(1))[0]
    else:
        ls = torch.where(keep, l, torch.zeros_like(l)).sum() / torch.clamp(r, min=1)
    ls = torch.where(r > 0, ls, torch.ones_like(ls))
    isq = torch.where(keep, torch.rsqrt(safe), torch.zeros_like(l))
    ones = torch.ones(T, dtype=G.dtype, device=G.device)
    w = torch.sqrt(ls) * (V @ (isq * (V.T @ ones)))
    w = torch.where(r > 0, w, ones) + poison
    return _ret(w, _closed_status(w), return_status)


def pcgrad(G: torch.Tensor, generator: torch.Generator | None = None,
           perms: torch.Tensor | None = None, reduction: str = "sum", *,
           return_status: bool = False):
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Alg. 1) in
    Gram form: :func:`gradops.pcgrad_weights` (SPEC §2). Weights are float32 whatever ``G``'s
    dtype (the op's recurrence runs in fp32); invariant to ``J -> sJ``."""
    if not isinstance(G, torch.Tensor) or G.dim() != 2:
        raise ValueError(f"gradops.weighting.pcgrad: G must be a square Gram [T, T], got "
                         f"{tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__}")
    w = pcgrad_weights(G, generator=generator, perms=perms, reduction=reduction)
    return _ret(w, _closed_status(w), return_status)


METHODS: dict[str, Callable] = {
    "ew": ew,
    "mgda": mgda,
    "cagrad": cagrad,
    "imtlg": imtlg,
    "nashmtl": nashmtl,
    "alignedmtl": alignedmtl,
    "pcgrad": pcgrad,
}
"""Name -> weighting function. Every function: ``f(G, ..., return_status=False)``."""

ITERATIVE = frozenset({"mgda", "cagrad", "nashmtl"})
"""Methods whose status can report non-convergence (the others are closed forms)."""


def get(name: str) -> Callable:
    """The weighting function called ``name`` (case, ``-`` and ``_`` ignored: ``"IMTL-G"``,
    ``"nash_mtl"``, ``"Aligned-MTL"`` work)."""
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else name
    if key not in METHODS:
        raise ValueError(f"gradops.weighting.get: unknown method {name!r}; valid names: "
                         f"{', '.join(sorted(METHODS))}")
    return METHODS[key]
