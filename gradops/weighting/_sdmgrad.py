"""SDMGrad (Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
Stochastic Algorithms", NeurIPS 2023)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._common import _prep, _tiny
from ._registry import GramMethod, Options, StepContext, register

__all__ = ["SDMGrad", "SDMGradOptions", "sdmgrad_step", "project_simplex"]


def project_simplex(y: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of ``y [T]`` onto the probability simplex (the sort-based
    algorithm of Held, Wolfe & Crowder 1974 / Duchi et al. 2008, as the authors' and LibMTL's
    ``euclidean_proj_simplex``), with no host read: ``rho`` = the number of sorted entries
    ``u_k`` with ``k u_k > sum_{j<=k} u_j - 1``, ``theta = (sum_{j<=rho} u_j - 1) / rho``,
    ``max(y - theta, 0)``."""
    T = y.shape[-1]
    u = torch.sort(y, descending=True).values
    css = torch.cumsum(u, 0) - 1.0
    k = torch.arange(1, T + 1, dtype=y.dtype, device=y.device)
    rho = torch.clamp((u * k > css).sum(), min=1)
    theta = css.gather(0, (rho - 1).reshape(1))[0] / rho.to(y.dtype)
    return torch.clamp(y - theta, min=0.0)


def sdmgrad_step(G: torch.Tensor, w: torch.Tensor, lam: float = 0.3, lr: float = 10.0,
                 momentum: float = 0.5, n_iter: int = 20
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SDMGrad weighting step (Xiao et al., NeurIPS 2023, Algorithm 1, SDMGrad; TorchJD's
    ``SDMGradWeighting.forward``, LibMTL's ``SDMGrad.backward``), from the inner iterate ``w``
    (on the simplex, carried over from the previous step): with ``A = G / s^2``,
    ``s = mean_i sqrt(max(G_ii, 0))`` and ``w~ = 1/T`` (the mean's direction), ``n_iter`` steps of
    projected SGD with heavy-ball momentum (velocity restarted at each call)::

        v <- grad (first step) | momentum v + grad,   grad = A (w + lam w~)
        w <- proj_simplex(w - lr v)

    on ``1/2 ||J^T (w + lam w~)||^2 / s^2`` (the direction-oriented MGDA's dual, a regulariser
    pulling ``d`` toward ``g0 = J^T w~``). Returns the weights ``(w + lam w~) / (1 + lam)`` of
    the algorithm's update ``d = (J^T w + lam g0) / (1 + lam)`` and the new inner iterate.

    ``n_iter`` is a fixed budget by design (the paper's algorithm; it does not iterate to a
    tolerance), so there is no convergence status.
    """
    G = _prep(G, "sdmgrad")
    T = G.shape[0]
    diag = torch.clamp(G.diagonal(), min=0.0)
    s2 = torch.sqrt(diag).mean() ** 2
    A = G / torch.clamp(s2, min=_tiny(G))
    w = w.to(device=G.device, dtype=G.dtype)
    wt = torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)
    vel = torch.zeros_like(w)
    for i in range(n_iter):
        grad = A @ (w + lam * wt)
        vel = grad if i == 0 else momentum * vel + grad
        w = project_simplex(w - lr * vel)
    return (w + lam * wt) / (1.0 + lam), w


@dataclass(frozen=True)
class SDMGradOptions(Options):
    lam: float = 0.3                # the paper's lambda (LibMTL's SDMGrad_lamda, TorchJD lambda_)
    lr: float = 10.0                # inner SGD step (TorchJD's default; LibMTL uses 5)
    momentum: float = 0.5           # inner SGD momentum
    n_iter: int = 20                # inner steps per optimizer step (LibMTL's SDMGrad_niter)

    def check(self) -> None:
        if not self.lam >= 0:
            self.fail("lam", f"must be >= 0, got {self.lam}")
        if not self.lr > 0:
            self.fail("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            self.fail("momentum", f"must be in [0, 1), got {self.momentum}")
        if self.n_iter < 1:
            self.fail("n_iter", f"must be >= 1, got {self.n_iter}")


@register
class SDMGrad(GramMethod):
    """Direction-oriented MGDA with a regulariser toward the mean gradient
    (:func:`sdmgrad_step`).

    Batches: the paper (Algorithm 1) estimates ``A = J_xi J_xi'^T`` from two independent batches and
    takes ``g0`` from a third, for unbiased stochastic gradients; the registry's ``gram`` kind
    has one batch, so here ``A = G = J J^T`` and ``d = w^T J`` of the same batch (TorchJD's
    ``SDMGradWeighting`` applied to the Gram; the deterministic form of their analysis). No
    second batch is needed, nothing beyond the backward passes is computed.

    Scale convention = LibMTL's and TorchJD's: the weights sum to 1 (``d`` is a convex
    combination of the task gradients, ``1/T`` of EW's sum at ``w = w~``), so their learning
    rates carry over; the weights are invariant to ``J -> sJ`` (``A`` is normalised by ``s^2``;
    TorchJD and LibMTL add ``1e-8`` to ``s^2``, a relative difference of ``1e-8 / s^2``).

    State: the inner iterate ``w [T]`` (uniform at the start), warm-starting the next step as in
    LibMTL and TorchJD, saved as ``sdmgrad_w``; a step whose Gram is non-finite returns NaN
    weights and leaves the state as it was. Cost: ``n_iter`` ``T x T`` products and sorts."""

    name = "sdmgrad"
    display = "SDMGrad"
    paper = ("Xiao, Ban & Ji, Direction-oriented Multi-objective Learning: Simple and Provable "
             "Stochastic Algorithms, NeurIPS 2023")
    Options = SDMGradOptions

    def __init__(self, options: SDMGradOptions | None = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self.w: torch.Tensor | None = None

    def weights(self, G: torch.Tensor, ctx: StepContext):
        T = G.shape[-1]
        prev = self.w
        if prev is None or prev.shape != (T,):
            prev = torch.full((T,), 1.0 / T, dtype=ctx.dtype, device=G.device)
        o = self.options
        out, w = sdmgrad_step(G, prev, o.lam, o.lr, o.momentum, o.n_iter)
        prev = prev.to(device=w.device, dtype=w.dtype)
        self.w = torch.where(torch.isfinite(w).all(), w, prev)
        return out, None

    def torchjd(self, T: int):
        """TorchJD's SDMGradWeighting applied to the Gram (one batch, as here)."""
        from torchjd.aggregation import GramianWeightedAggregator, SDMGradWeighting
        o = self.options
        return GramianWeightedAggregator(SDMGradWeighting(lr=o.lr, momentum=o.momentum,
                                                          n_iter=o.n_iter, lambda_=o.lam))

    def state_dict(self) -> dict[str, Any]:
        return {} if self.w is None else {"sdmgrad_w": self.w.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        w = state.get("sdmgrad_w")
        self.w = None if w is None else w.clone()
