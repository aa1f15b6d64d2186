"""IMTL-G (Liu et al. 2021)."""
from __future__ import annotations


import torch

from ._common import _closed_status, _eigh_psd, _eps, _prep, _ret
from dataclasses import dataclass

from ._registry import GramMethod, Options, StepContext, register


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

    Precision: the ``T x T`` eigendecomposition and solve run in float64 whatever ``G``'s dtype
    (the weights come back in the working dtype, float32 or float64), with the rank cut and the
    thresholds at the working dtype's ``eps`` (the rounding of ``G`` itself). On a singular
    float32 ``G`` the float32 ``eigh`` put its own rounding (``~eps l_max`` per eigenpair,
    different for each task order) into the near-zero eigenvalues next to the cut: a 4 x 3
    input's weights moved by 2.2e-4 across task orders. In float64 permuting the tasks
    permutes ``G`` exactly and the decomposition adds nothing at float32's resolution.

    ``T = 1`` gives ``[1]``. If ``|1^T G^+ n|`` vanishes (``<= eps / max_i n_i``), ``w = 0``
    (TorchJD's choice). Weights are invariant to ``J -> sJ``; ``d`` scales by ``s``.

    Args:
        G: the Gram ``J J^T`` ``[T, T]`` (``T >= 1``, floating point, any device).
        ridge: Tikhonov damping, relative to the largest eigenvalue (>= 0).
        rcond: the relative rank cut (>= 0; None: ``T eps`` of the working dtype).
        return_status: also return the :class:`SolverStatus`.

    Returns:
        ``w [T]`` (the update is ``d = w^T J``), or ``(w, status)`` with ``return_status``.

    Raises:
        TypeError: for a ``G`` that is not a floating-point tensor.
        ValueError: for a ``G`` that is not a square ``[T, T]``, or a negative ``ridge`` or
            ``rcond``.
    """
    G = _prep(G, "imtlg")
    if not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise ValueError(f"gradops.weighting.imtlg: ridge must be a float >= 0, got {ridge!r}")
    T = G.shape[0]
    if T == 1:
        w = torch.ones(1, dtype=G.dtype, device=G.device) + 0.0 * G[0]
        return _ret(w, _closed_status(w), return_status)
    eps = _eps(G)                           # of the working dtype: G's rounding
    if rcond is None:
        rcond = T * eps
    dt = G.dtype
    G = G.to(torch.float64)                 # the T x T solve in float64 (see the docstring)
    n = torch.sqrt(torch.clamp(G.diagonal(), min=0.0))
    l, V, keep, poison = _eigh_psd(G, rcond)
    lmax = torch.clamp(l.max(), min=0.0)
    inv = torch.where(keep, 1.0 / torch.where(keep, l + ridge * lmax, torch.ones_like(l)),
                      torch.zeros_like(l))
    v = V @ (inv * (V.T @ n))
    v = torch.where(n > eps * n.max(), v, torch.zeros_like(v))   # zero gradients: exactly 0
    s = v.sum()
    ok = s.abs() * n.max() > eps
    w = torch.where(ok, v / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(v))
    w = (w + poison).to(dt)                 # NaN / Inf in G propagate
    return _ret(w, _closed_status(w), return_status)


@dataclass(frozen=True)
class IMTLGOptions(Options):
    ridge: float = 0.0              # added to the Gram's diagonal before the solve
    rcond: float | None = None

    def check(self) -> None:
        self.check_nonnegative("ridge", "rcond")


@register
class IMTLG(GramMethod):
    """IMTL's gradient balance (:func:`imtlg`)."""

    name = "imtlg"
    display = "IMTL-G"
    paper = "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021"
    Options = IMTLGOptions
    order = 60

    def weights(self, G: torch.Tensor, ctx: StepContext):
        return imtlg(G, **self.options.as_dict(), return_status=True)

    def torchjd(self, T: int):
        from torchjd.aggregation import IMTLG as TorchJDIMTLG
        return TorchJDIMTLG()
