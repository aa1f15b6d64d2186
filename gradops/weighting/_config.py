"""ConFIG (Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed
Neural Networks", ICLR 2025)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import _closed_status, _eigh_psd, _prep, _ret
from ._registry import GramMethod, Options, StepContext, register

__all__ = ["ConFIG", "ConFIGOptions", "config"]


def config(G: torch.Tensor, rcond: float | None = None, *, return_status: bool = False):
    """ConFIG (Liu, Chu & Thuerey, ICLR 2025, Eq. 2 and Alg. 1; TorchJD's ``ConFIG``): the
    direction ``g_v = U^+ 1`` that has the same (unit) projection on every unit task gradient
    (``U`` the matrix of rows ``u_i = g_i / ||g_i||``, ``^+`` the pseudo-inverse: the least-norm
    solution of ``U g_v = 1``), normalised, ``g_u = g_v / ||g_v||``, and scaled by the sum of
    the gradients' projections on it: ``d = (sum_i g_i . g_u) g_u``.

    From the Gram only: with ``n_i = sqrt(G_ii)``, ``D = diag(n)`` and the unit Gram
    ``Gu = D^-1 G D^-1 = U U^T``, ``U^+ = U^T Gu^+`` so ``g_v = J^T D^-1 a``, ``a = Gu^+ 1``,
    ``||g_v||^2 = a^T Gu a`` and ``sum_i g_i . g_v = n^T Gu a``; hence
    ``w = D^-1 a (n^T Gu a) / (a^T Gu a)`` and ``d = w^T J``. ``Gu^+`` by ``torch.linalg.eigh``
    in float64, eigenvalues ``<= rcond * l_max`` cut (default ``rcond = T eps`` of the working
    dtype, as IMTL-G; TorchJD's ``torch.linalg.pinv`` of ``U`` cuts singular values at
    ``max(T, P) eps``: the same answer wherever ``U`` is not nearly rank-deficient). A zero task
    gradient gets the unit vector 0 (TorchJD's ``nan_to_num``) and weight 0; all-zero gradients
    give ``w = 0``.

    Scale convention: TorchJD's and the authors' (``ProjectionLength``, equal weights): the
    length is the **sum** of the projections, so ``d = sum_i g_i`` for identical gradients,
    gradops' (and EW's) sum convention; LibMTL has no ConFIG. Weights are invariant to
    ``J -> sJ``; ``d`` scales by ``s``. The authors' momentum variant (M-ConFIG) is not
    implemented.

    State: none. Cost beyond the ``T`` backward passes: the Gram and one ``T x T``
    eigendecomposition (closed form: ``converged`` says the weights are finite).
    """
    G = _prep(G, "config")
    dt = G.dtype
    Gd = G.to(torch.float64)
    n = torch.sqrt(torch.clamp(Gd.diagonal(), min=0.0))
    inv = torch.where(n > 0, 1.0 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))
    Gu = Gd * inv[:, None] * inv[None, :]
    eps = torch.finfo(dt).eps
    l, V, keep, poison = _eigh_psd(Gu, G.shape[0] * eps if rcond is None else rcond)
    il = torch.where(keep, 1.0 / torch.where(keep, l, torch.ones_like(l)), torch.zeros_like(l))
    a = V @ (il * V.sum(0))                          # Gu^+ 1
    Gua = Gu @ a
    q = a @ Gua                                      # ||g_v||^2 (unit-gradient space)
    ok = q > 0
    w = torch.where(ok, inv * a * (n @ Gua) / torch.where(ok, q, torch.ones_like(q)),
                    torch.zeros_like(a))
    w = (w + poison).to(dt)
    return _ret(w, _closed_status(w), return_status)


@dataclass(frozen=True)
class ConFIGOptions(Options):
    rcond: float | None = None      # rank cut of the unit Gram's pseudo-inverse (None: T eps)

    def check(self) -> None:
        if self.rcond is not None and not self.rcond >= 0:
            self.fail("rcond", f"must be >= 0 or None, got {self.rcond}")


@register
class ConFIG(GramMethod):
    """Conflict-free direction scaled by the projections (:func:`config`)."""

    name = "config"
    display = "ConFIG"
    paper = ("Liu, Chu & Thuerey, ConFIG: Towards Conflict-free Training of Physics Informed "
             "Neural Networks, ICLR 2025")
    Options = ConFIGOptions

    def weights(self, G: torch.Tensor, ctx: StepContext):
        return config(G, **self.options.as_dict(), return_status=True)

    def torchjd(self, T: int):
        from torchjd.aggregation import ConFIG as TorchJDConFIG
        return TorchJDConFIG()
