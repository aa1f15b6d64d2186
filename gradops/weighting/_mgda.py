"""MGDA (Sener & Koltun 2018)."""
from __future__ import annotations


import torch

from ._common import _check_iter, _poison, _prep, _ret, _tiny
from ._solvers import _simplex_qp
from dataclasses import dataclass

from ._registry import GramMethod, Options, StepContext, register

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

    Solver: Wolfe's min-norm-point algorithm (Wolfe 1976; see
    :func:`gradops.weighting._solvers._simplex_qp`), an exact active-set method: a corral of
    affinely independent tasks whose affine min-norm point comes from a small Cholesky solve in
    float64, a ratio test that drops a task, and the task of smallest ``(G w)_i`` added. It
    terminates finitely (about ``T`` steps when every task is active), from the task of
    smallest norm, at most ``max_iter`` steps. Residual = Frank-Wolfe gap / ``max_i Gn_ii``
    (``||d - d*||^2 <= residual * max_i Gn_ii`` in the normalised space), at float64's rounding
    level once converged; ``converged`` when it is ``<= tol``. ``T = 1`` needs no step.

    Scale: with ``"none"`` the weights are invariant to ``J -> sJ`` and ``d`` scales by ``s``;
    with ``"l2"``, ``d`` is invariant to scaling any task's gradient by ``c_i > 0``. ``d`` is
    unique; ``w`` is unique when the gradients are affinely independent.

    Args:
        G: the Gram ``J J^T`` ``[T, T]`` (``T >= 1``, floating point, any device).
        normalization: one of :data:`MGDA_NORMALIZATIONS` (``"none"``, ``"l2"``, ``"loss"``,
            ``"loss+"``).
        losses: the task losses ``[T]`` (needed by ``"loss"`` and ``"loss+"``, else unused).
        max_iter: the solver's iteration budget (a Python int >= 0: no host synchronisation).
        tol: the residual at which the iterate counts as converged and is frozen (>= 0).
        early_exit: stop the loop once converged (None: on CPU tensors in eager mode only;
            the result is the same either way).
        return_status: also return the :class:`SolverStatus`.

    Returns:
        ``w [T]`` (the update is ``d = w^T J``), or ``(w, status)`` with ``return_status``.

    Raises:
        TypeError: for a ``G`` that is not a floating-point tensor.
        ValueError: for a ``G`` that is not a square ``[T, T]``, an unknown ``normalization``,
            missing or misshaped ``losses``, or a bad ``max_iter`` / ``tol``.
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
    w, status = _simplex_qp(Gn, max_iter, tol, scale, early_exit=early_exit)
    return _ret(w * inv + _poison(G), status, return_status)


@dataclass(frozen=True)
class MGDAOptions(Options):
    normalization: str = "none"     # one of MGDA_NORMALIZATIONS
    max_iter: int = 250             # the solver's iteration budget (a Python int: no host sync)
    tol: float = 1e-5               # the tolerance that freezes a converged iterate on the device
    early_exit: bool | None = None  # CPU eager: stop once converged (None: automatic; same result)

    def check(self) -> None:
        self.check_nonnegative("max_iter", "tol")
        self.check_choice("normalization", MGDA_NORMALIZATIONS)


@register
class MGDA(GramMethod):
    """MGDA-UB's min-norm point (:func:`mgda`); the ``loss`` normalisations read the step's
    losses."""

    name = "mgda"
    display = "MGDA"
    paper = "Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018"
    Options = MGDAOptions
    scale_invariant = False     # d scales with J (w does not; 'loss' normalisations read losses)
    iterative = True
    order = 40

    def weights(self, G: torch.Tensor, ctx: StepContext):
        return mgda(G, **self.options.as_dict(), losses=ctx.losses, return_status=True)

    def torchjd(self, T: int):
        from torchjd.aggregation import MGDA as TorchJDMGDA
        return TorchJDMGDA()
