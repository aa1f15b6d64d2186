"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._common import _closed_status, _poison, _prep
from ._registry import LossMethod, Options, StepContext, register

__all__ = ["GradNorm", "GradNormOptions"]

INITIAL = ("epoch", "step")


@dataclass(frozen=True)
class GradNormOptions(Options):
    alpha: float = 1.5              # the restoring force alpha (LibMTL's default)
    initial: str = "epoch"          # L_t(0): "epoch" (LibMTL) or "step" (the paper)

    def check(self) -> None:
        if not self.alpha >= 0:
            self.fail("alpha", f"must be >= 0, got {self.alpha}")
        if self.initial not in INITIAL:
            self.fail("initial", f"must be one of {INITIAL}, got {self.initial!r}")


@register
class GradNorm(LossMethod):
    """Loss weights ``c = T softmax(w)`` (LibMTL's parametrisation; ``w`` initialised to 1, so
    ``c = 1``) trained so that the weighted per-task gradient norms ``G_t = c_t ||g_t||`` move
    towards ``Gbar r_t^alpha`` (the paper's ``L_grad``, Sec. 3), in the form of LibMTL's
    ``GradNorm`` (``rep_grad=False``):

    - ``||g_t|| = sqrt(G_tt)`` from the Gram of the raw task losses' gradients over all shared
      parameters (LibMTL's ``_get_grads``; the paper uses the last shared layer only);
    - ``Gbar = mean_t G_t``, ``r_t = Lt_t / mean(Lt)``, ``Lt_t = L_t / L_t(0)`` with ``L_t``
      this step's (global-batch) loss;
    - ``L_grad = sum_t |G_t - C_t|`` with the target ``C_t = Gbar r_t^alpha`` held constant
      (detached, as in the paper and LibMTL); its gradient with respect to ``w``,
      ``dL/dw_j = T s_j (v_j - sum_i s_i v_i)`` with ``s = softmax(w)`` and
      ``v_t = sign(G_t - C_t) ||g_t||`` (what ``L_grad.backward()`` puts in LibMTL's
      ``loss_scale.grad``; ``sign(0) = 0`` as autograd's ``abs``), is written to ``w.grad``
      (added, as a backward would; times AMP's scale when it is set, so the scaler's
      unscaling leaves the true gradient);
    - ``w`` is a parameter of the model's optimizer (``MTLOptimizer(num_tasks=T)`` adds it as
      a parameter group with the optimizer's defaults, learning rate and weight decay
      included), as LibMTL's ``loss_scale`` is trained with the model: the weights are updated
      by that optimizer's ``step`` on this gradient;
    - the shared update is ``d = sum_t c_t g_t`` with this step's ``c`` (before the update of
      ``w``); the task-specific parameters get the raw losses' gradients, unweighted (LibMTL's
      per-task backward passes do the same).

    ``L_t(0)``: ``initial="epoch"`` (LibMTL): the first epoch runs EW (``c = 1``, ``w`` gets no
    gradient) and ``L(0)`` is that epoch's mean losses (``MTLOptimizer.end_epoch()``, LibMTL's
    ``train_loss_buffer[:, 0]``); ``initial="step"`` (the paper): ``L(0)`` is the first step's
    losses and GradNorm runs from the first step. The paper's renormalisation of ``w`` to sum
    to ``T`` after each step is LibMTL's softmax parametrisation here.

    Scale convention: LibMTL's (``sum_t c_t = T``, EW's scale), so its learning rates carry
    over. TorchJD has no GradNorm. ``scale_invariant`` is False: the gradient of ``w`` scales
    with ``||g||`` (the optimizer passes the unscaled Gram under AMP). A NaN / Inf in the Gram
    gives NaN weights and a NaN gradient of ``w`` (a GradScaler then skips the step). State:
    ``w`` and ``L(0)``. Cost: the per-task backward passes; the rest is ``O(T)``."""

    name = "gradnorm"
    display = "GradNorm"
    paper = ("Chen et al., GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep "
             "Multitask Networks, ICML 2018")
    Options = GradNormOptions
    has_parameters = True
    weights_from_gram = True
    scale_invariant = False
    order = 70

    def setup(self, T: int, device: torch.device) -> None:
        super().setup(T, device)
        self.w = torch.nn.Parameter(torch.ones(T, device=device))
        self.initial_losses: torch.Tensor | None = None
        self._c: torch.Tensor | None = None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.w]

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor, ctx: StepContext
              ) -> list[torch.Tensor]:
        return list(losses)

    def weights(self, G: torch.Tensor, ctx: StepContext):
        G = _prep(G, "gradnorm")
        if self.initial_losses is None and self.options.initial == "step":
            if ctx.losses is None:
                raise ValueError("GradNorm.weights: the step's losses (ctx.losses) are needed")
            self.initial_losses = ctx.losses.detach().clone()
        if self.initial_losses is None:            # LibMTL's first epoch: EW
            c = torch.ones(self.T, dtype=G.dtype, device=G.device) + _poison(G)
            self._c = c
            return c, _closed_status(c)
        c, grad = self.gradient(G, ctx.losses)
        if ctx.scale is not None:
            grad = grad * ctx.scale.to(grad)
        grad = grad.to(self.w)
        self.w.grad = grad if self.w.grad is None else self.w.grad + grad
        c = (c + _poison(G)).to(G.dtype)
        self._c = c
        return c, _closed_status(c)

    def gradient(self, G: torch.Tensor, losses: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's loss weights ``c = T softmax(w)`` and ``dL_grad/dw`` (float64) from the
        unscaled Gram and the step's losses.

        Args:
            G: the unscaled Gram of the task gradients ``[T, T]``.
            losses: the step's detached, unscaled losses ``[T]``.

        Returns:
            ``(c, grad)``: the loss weights ``[T]`` and the gradient of GradNorm's loss with
            respect to the logits ``w`` ``[T]``, both float64.
        """
        T = self.T
        Gd = G.to(torch.float64)
        s = torch.softmax(self.w.detach().to(torch.float64), dim=0)
        c = T * s
        n = torch.sqrt(torch.clamp(Gd.diagonal(), min=0.0))
        Gt = c * n
        Lt = losses.detach().to(torch.float64) / self.initial_losses.to(torch.float64)
        r = Lt / Lt.mean()
        target = Gt.mean() * r ** self.options.alpha
        v = torch.sign(Gt - target) * n
        return c, T * s * (v - (s * v).sum())

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        if self.initial_losses is None and self.options.initial == "epoch":
            self.initial_losses = mean_losses.detach().clone()

    def loss_weights(self) -> torch.Tensor | None:
        return self._c

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.detach().clone(),
                "initial_losses": None if self.initial_losses is None else
                self.initial_losses.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        L0 = state["initial_losses"]
        self.initial_losses = None if L0 is None else L0.to(self.w.device)
