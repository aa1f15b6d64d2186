"""What every weighting shares: the solver status, the checks of ``G``, dtype constants, NaN
propagation, and the eigendecomposition with a rank cut (IMTL-G, Aligned-MTL)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _backend
from .._validate import _is_fake


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


def solver_backend(op: str, G: torch.Tensor) -> str:
    """The backend that runs the solver registered as ``op`` on ``G``. Always ``"torch"`` under
    ``torch.compile`` (kernel calls are opaque to tracing) and for fake tensors; otherwise
    :func:`gradops._backend.select_backend` decides, and a forced backend applies. A ``G`` that
    requires grad (grad mode on) keeps the differentiable torch loop; forcing another backend
    for it raises ``RuntimeError``."""
    if torch.compiler.is_compiling() or _is_fake(G):
        return "torch"
    backend = _backend.select_backend(op, G.device, G.shape[0])
    if backend != "torch" and G.requires_grad and torch.is_grad_enabled():
        if _backend.forced_backend() == backend:
            raise RuntimeError(f"gradops.{op}: forced backend {backend!r} cannot run this call: "
                               "G requires grad and only the torch solver is differentiable")
        return "torch"
    return backend
