"""MoDo (Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning:
Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023; JMLR 2024)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ._common import _prep
from ._registry import GramMethod, Options, StepContext, register
from ._simplex import project_simplex

__all__ = ["MoDo", "MoDoOptions", "modo_update"]


def modo_update(G: torch.Tensor, lam: torch.Tensor, gamma: float, rho: float) -> torch.Tensor:
    """One MoDo weight step: ``Pi_Delta(lam - gamma (G lam + rho lam))`` (the paper's Eq. 2.9a /
    Algorithm 1, line 5; TorchJD's ``MoDoWeighting.forward``; LibMTL's ``MoDo.backward``).

    ``G`` is ``[T, T]``: the double-sampling cross-Gram ``J_1 J_2^T`` of two independent batches
    (the paper's unbiased estimate of ``grad F^T grad F``; it need not be symmetric), or the
    single-batch Gram ``J J^T`` (what :class:`MoDo` receives from the optimizer). On ``G``'s
    device, in ``lam``'s dtype; a NaN/Inf in ``G`` or ``lam`` gives NaN."""
    G = G.to(lam.dtype)
    return project_simplex(lam - gamma * (G @ lam + rho * lam))


@dataclass(frozen=True)
class MoDoOptions(Options):
    gamma: float = 0.1              # gamma: step size of lambda (TorchJD's default; LibMTL 1e-3)
    rho: float = 0.1                # rho: l2 regularisation of lambda's update

    def check(self) -> None:
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            self.fail("gamma", f"must be a finite float > 0, got {self.gamma}")
        if not (self.rho >= 0 and math.isfinite(self.rho)):
            self.fail("rho", f"must be a finite float >= 0, got {self.rho}")


@register
class MoDo(GramMethod):
    """MoDo: keep task weights ``lambda`` on the simplex (starting at ``1/T``) and move them by
    one projected gradient step per training step, ``lambda <- Pi_Delta(lambda - gamma (G lambda
    + rho lambda))`` (:func:`modo_update`; Eq. 2.9a), then update the model along
    ``d = sum_t lambda_t g_t`` (Eq. 2.9b).

    Double sampling, and what this registry method does instead. The paper (and TorchJD's
    ``MoDoWeighting``, whose docstring warns about it) forms ``G = J_1 J_2^T`` from two
    independent mini-batches, so that ``E[G] = grad F^T grad F`` without the gradient noise's
    covariance, and updates the model with a third batch's (or the two batches' mean)
    gradients. ``MTLOptimizer`` forms one Jacobian per step, and the registry hands a Gram
    method only its Gram: here ``G = J J^T`` of the step's batch (the single-sample variant:
    its ``lambda`` step is biased by the covariance of the per-batch gradients, so the paper's
    convergence guarantee does not apply; it is what TorchJD's ``MoDoWeighting`` computes
    when fed ``J J^T``). Callers that draw two batches themselves can call
    :func:`modo_update` with ``J_1 J_2^T`` (``gradops.ops.gram`` does not form cross-Grams:
    ``J1 @ J2.T``) and combine with the weights it returns. Real double sampling would cost a
    second batch per step: a second forward and ``T`` more backward passes, a second ``[T, P]``
    Jacobian and the ``[T, T]`` cross product (three batches in LibMTL's version).

    Scale: ``lambda`` lies on the simplex, so ``d`` is a convex combination: the mean scale of
    LibMTL's and TorchJD's MoDo (their ``backward(weights)``), so their learning rates carry
    over; ``gamma``'s effect grows with ``||g||^2``, so ``gamma`` tuned with TorchJD
    (default 0.1, ours) or LibMTL (default ``MoDo_gamma = 0.001``) carries over only for the
    same loss scale. Not scale invariant: under AMP the optimizer hands it the unscaled Gram.

    State (``state_dict``: ``modo_lambda``): ``lambda`` ``[T]``. A non-finite ``G`` (an AMP
    overflow) gives NaN weights and leaves ``lambda`` unchanged. Cost: ``T x T`` work after the
    Gram (a sort of ``T`` values for the projection), no host synchronisation; nothing beyond
    the Gram and the combine."""

    name = "modo"
    display = "MoDo"
    paper = ("Chen et al., Three-Way Trade-Off in Multi-Objective Learning: Optimization, "
             "Generalization and Conflict-Avoidance, NeurIPS 2023")
    Options = MoDoOptions
    scale_invariant = False
    order = 200

    def __init__(self, options: MoDoOptions | None = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self.lam: torch.Tensor | None = None

    def weights(self, G: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, None]:
        G = _prep(G, "modo")
        T = G.shape[0]
        lam = self.lam
        if lam is None:
            lam = torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)
        elif lam.shape != (T,):
            raise ValueError(f"method 'modo': its state holds {lam.shape[0]} weights, got a "
                             f"Gram of {T} tasks")
        lam = lam.to(G.device, G.dtype)
        new = modo_update(G, lam, self.options.gamma, self.options.rho)
        finite = torch.isfinite(G).all()
        self.lam = torch.where(finite, new, lam)
        return new, None            # NaN where G is not finite

    def torchjd(self, T: int):
        """TorchJD's ``MoDoWeighting`` on the single-batch Gramian (what this method computes);
        TorchJD has no MoDo aggregator of its own."""
        from torchjd.aggregation import GramianWeightedAggregator, MoDoWeighting
        return GramianWeightedAggregator(MoDoWeighting(gamma=self.options.gamma,
                                                       rho=self.options.rho))

    def state_dict(self) -> dict[str, Any]:
        return {} if self.lam is None else {"modo_lambda": self.lam.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lam = state.get("modo_lambda")
        extra = set(state) - {"modo_lambda"}
        if extra:
            raise ValueError(f"method 'modo': unknown state keys {sorted(extra)}")
        self.lam = None if lam is None else lam.clone()
