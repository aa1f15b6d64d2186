"""DB-MTL, dual-balancing multi-task learning (Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang &
Kwok, "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029, 2023)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._common import _closed_status, _poison, _prep
from ._registry import LossMethod, Options, StepContext, register

__all__ = ["DBMTL", "DBMTLOptions"]


@dataclass(frozen=True)
class DBMTLOptions(Options):
    beta: float = 0.9               # the EMA factor beta (LibMTL's DB_beta)
    beta_sigma: float = 0.0         # beta_k = beta / k^beta_sigma (LibMTL's DB_beta_sigma)
    eps: float = 1e-8               # in log(L + eps) and in max n / (n + eps), as LibMTL

    def check(self) -> None:
        if not 0 <= self.beta < 1:
            self.fail("beta", f"must be in [0, 1), got {self.beta}")
        if not self.beta_sigma >= 0:
            self.fail("beta_sigma", f"must be >= 0, got {self.beta_sigma}")
        if not self.eps >= 0:
            self.fail("eps", f"must be >= 0, got {self.eps}")


@register
class DBMTL(LossMethod):
    """Loss-scale balancing by log losses, then gradient-magnitude balancing by the largest
    (EMA'd) gradient norm (the paper's method; LibMTL's ``DB_MTL``):

    - terms ``a_t L_t`` with ``a_t = 1 / (L_t + eps)`` from the detached (global-batch,
      unscaled) losses: the gradient of ``log(L_t + eps)``, per task, correctly scaled under
      AMP;
    - from the Gram ``G`` of those gradients, ``n_t = sqrt(G_tt)``, the EMA
      ``nu_t <- n_t + beta_k (nu_t - n_t)`` with ``beta_k = beta / k^beta_sigma`` at step
      ``k = 1, 2, ...`` and ``nu = 0`` before the first step (LibMTL's recursion and
      constants), and weights ``w_t = max_s nu_s / (nu_t + eps)``: the update is
      ``d = sum_t w_t g_t``.

    **Difference from the paper and LibMTL**: they keep the EMA of the task *gradients*
    (``grad_buffer``, a ``[T, P]`` state), normalise its rows and combine *them*
    (``d = sum_t w_t g^_t``, momentum on the direction as well). A loss method here sees only
    the Gram of the current gradients, so the EMA runs on the norms and the current gradients
    are combined: with ``beta = 0`` the two are the same update exactly; with constant
    gradients LibMTL's update is ``(1 - prod_j beta_j)`` times this one (its uncorrected EMA
    of the gradients shrinks the first steps; here only the weights' ratio uses the EMA);
    with noisy gradients LibMTL's direction is additionally averaged over steps.

    Scale convention: the sum convention with the largest-norm task at weight 1 (LibMTL's:
    every task's share of ``d`` has the largest norm), so LibMTL's learning rates carry over
    up to the factor above early on. TorchJD has no DB-MTL. ``scale_invariant`` is False: the
    EMA needs the unscaled Gram under AMP (the optimizer passes it). A Gram with a NaN / Inf
    gives NaN weights and leaves the EMA unchanged (the step count still advances). State: the
    step count and ``nu [T]``. Cost: the per-task backward passes (no ``[T, P]`` buffer)."""

    name = "db-mtl"
    display = "DB-MTL"
    paper = "Lin et al., Dual-Balancing for Multi-Task Learning, arXiv 2308.12029, 2023"
    Options = DBMTLOptions
    weights_from_gram = True
    scale_invariant = False
    order = 65

    def setup(self, T: int, device: torch.device) -> None:
        super().setup(T, device)
        self.step = 0
        self.nu = torch.zeros(T, dtype=torch.float64, device=device)
        self._w: torch.Tensor | None = None

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor, ctx: StepContext
              ) -> list[torch.Tensor]:
        a = 1.0 / (values.detach() + self.options.eps)
        return [a[t].to(loss.dtype) * loss for t, loss in enumerate(losses)]

    def weights(self, G: torch.Tensor, ctx: StepContext):
        o = self.options
        G = _prep(G, "db_mtl")
        self.step += 1
        b = o.beta / self.step ** o.beta_sigma
        Gd = G.to(torch.float64)
        n = torch.sqrt(torch.clamp(Gd.diagonal(), min=0.0))
        nu_old = self.nu.to(G.device)
        nu = n + b * (nu_old - n)
        self.nu = torch.where(torch.isfinite(Gd).all(), nu, nu_old)
        w = nu.max() / (nu + o.eps)
        w = (w + _poison(Gd)).to(G.dtype)
        self._w = w
        return w, _closed_status(w)

    def loss_weights(self) -> torch.Tensor | None:
        return self._w

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "nu": self.nu.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.nu = state["nu"].to(self.nu)
