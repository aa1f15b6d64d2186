"""GradVac (Wang et al. 2021), per layer, in Gram form."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ops.pcgrad import random_orders
from ._registry import LayerMethod, Options, StepContext, register


def gradvac_weights(G: torch.Tensor, targets: torch.Tensor, perms: torch.Tensor, beta: float,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GradVac (Wang et al., "Gradient Vaccine", ICLR 2021, Alg. 1) per layer, in Gram form.

    For each layer ``l`` and task ``i``: ``g_i' = g_i``; for ``j != i`` in the order ``perms[i]``,
    with ``phi = cos(g_i', g_j)`` and the EMA target ``phi^ = targets[l, i, j]``: if
    ``phi < phi^``, ``g_i' += g_j ||g_i'|| (phi^ sqrt(1 - phi^2) - phi sqrt(1 - phi^^2)) /
    (||g_j|| sqrt(1 - phi^^2))`` (Eq. 8); then ``phi^ <- (1 - beta) phi^ + beta phi`` (Eq. 9,
    LibMTL's placement: every visited pair). The update is ``sum_i g_i'``.

    Numerical guards (not in the paper or LibMTL, whose loops blow up on them): ``phi`` is clamped
    to ``[-1, 1]`` (after a correction cancels ``g_i'``, ``||g_i'|| ~ 0`` and the rounded ratio
    leaves the range, which the EMA would carry into the targets), the targets read are clamped
    the same way, and ``1 - phi^^2`` is floored at the dtype's ``eps`` (a target of exactly
    ``+-1``, reached by the EMA of parallel tasks, would need an infinite correction; the floor
    is the value at the representable cosine next to ``+-1``). Hence ``|phi^| <= 1`` always and
    each correction is finite: ``||g_i''|| = ||g_i'|| sqrt(1 - phi^2) / sqrt(1 - phi^^2)``.

    With ``g_i' = sum_k C[l, i, k] g_k`` every quantity is a function of ``G``: all rows and layers
    advance together, ``T`` steps of batched ``[L, T, T]`` arithmetic on ``G``'s device.

    Args:
        G: per-layer Grams ``[L, T, T]``.
        targets: the EMA targets ``phi^`` ``[L, T, T]`` (start at 0).
        perms: ``[T, T]`` orders (row ``i`` visits the tasks in that order; ``j = i`` is skipped).
        beta: the EMA weight of a new cosine (Eq. 9), in ``[0, 1]``.
        eps: added to the norms' products in the cosine and the correction's divisor (guards
            zero gradients).

    Returns:
        weights ``[L, T]`` (``sum_i C[l, i, :]``) and the new targets (non-finite values leave
        the old targets in place, so one overflowed AMP step does not poison the EMA).
    """
    L, T, _ = G.shape
    G = G.to(torch.float64 if G.dtype == torch.float64 else torch.float32)  # fp64 stays fp64
    C = torch.eye(T, dtype=G.dtype, device=G.device).expand(L, T, T).clone()
    tgt = targets.to(G.dtype, copy=True)
    rows = torch.arange(T, device=G.device)
    diag = G.diagonal(dim1=-2, dim2=-1)                       # [L, T]
    feps = torch.finfo(G.dtype).eps
    for s in range(T):
        j = perms[:, s]                                       # [T]: the task row i visits now
        active = (j != rows)[None, :]                         # [1, T]
        CG = C @ G                                            # [L, T, T]
        dot = CG[:, rows, j]                                  # (C G)_{i j}
        ni = torch.sqrt(torch.clamp((CG * C).sum(-1), min=0))  # ||g_i'||
        nj = torch.sqrt(torch.clamp(diag[:, j], min=0))       # ||g_j||
        phi = torch.clamp(dot / (ni * nj + eps), -1.0, 1.0)      # a cosine, also when g_i' ~ 0
        phi_t = torch.clamp(tgt[:, rows, j], -1.0, 1.0)
        # a target of exactly +-1 would need an infinite correction (see the docstring)
        root_t = torch.sqrt(torch.clamp(1 - phi_t * phi_t, min=feps))
        root = torch.sqrt(torch.clamp(1 - phi * phi, min=0))
        coef = ni * (phi_t * root - phi * root_t) / (nj * root_t + eps)
        coef = torch.where(active & (phi < phi_t), coef, torch.zeros_like(coef))
        C[:, rows, j] += coef
        new_t = (1 - beta) * phi_t + beta * phi
        keep = active & torch.isfinite(new_t)
        tgt[:, rows, j] = torch.where(keep, new_t, phi_t)
    # a layer whose Gram holds a NaN/Inf gets NaN weights (its comparisons are False for NaN,
    # which would otherwise leave the plain sum), as every op propagates non-finite values
    bad = ~torch.isfinite(G).all(-1).all(-1)
    return C.sum(1).masked_fill(bad[:, None], float("nan")), tgt


@dataclass(frozen=True)
class GradVacOptions(Options):
    beta: float = 0.5               # EMA weight of a new cosine (Eq. 9)
    eps: float = 1e-8               # added to the norms' products

    def check(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            self.fail("beta", f"must be in [0, 1], got {self.beta}")
        self.check_nonnegative("eps")


@register
class GradVac(LayerMethod):
    """GradVac per layer (:func:`gradvac_weights`); its state, the EMA targets ``[L, T, T]``,
    is saved in the optimizer's state dict (``gradvac_targets``)."""

    name = "gradvac"
    display = "GradVac"
    paper = ("Wang et al., Gradient Vaccine: Investigating and Improving Multi-task "
             "Optimization in Massively Multilingual Models, ICLR 2021")
    Options = GradVacOptions
    random = True
    order = 30

    def __init__(self, options: GradVacOptions | None = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self.targets: torch.Tensor | None = None

    def weights(self, G: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        perms = random_orders(G.shape[-1], generator=ctx.generator, device=G.device)
        tgt = self.targets
        tgt = torch.zeros_like(G, dtype=ctx.dtype) if tgt is None else \
            tgt.to(device=G.device, dtype=ctx.dtype)
        w, self.targets = gradvac_weights(G, tgt, perms, self.options.beta, self.options.eps)
        return w

    def torchjd(self, T: int):
        """TorchJD's GradVac (whole model, not per layer)."""
        from torchjd.aggregation import GradVac as TorchJDGradVac
        return TorchJDGradVac()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.targets is None else {"gradvac_targets": self.targets.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = state.get("gradvac_targets")
        self.targets = None if t is None else t.clone()
