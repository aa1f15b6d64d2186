"""FAMO (Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization",
NeurIPS 2023)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._registry import LossMethod, Options, StepContext, register

__all__ = ["FAMO", "FAMOOptions"]


@dataclass(frozen=True)
class FAMOOptions(Options):
    lr: float = 0.025               # Adam's learning rate of the logits w (the paper's beta)
    gamma: float = 0.001            # Adam's weight decay of w (the paper's gamma)
    eps: float = 1e-8               # added to L_t - m_t

    def check(self) -> None:
        self.check_nonnegative("lr", "gamma", "eps")


@register
class FAMO(LossMethod):
    """The loss fed to backward is ``sum_t z_t log(L_t - m_t) / c`` with ``z = softmax(w)``,
    ``c = sum_t z_t / (L_t - m_t)`` (``m_t = 0``, the paper's default minimum loss; Alg. 1).
    Its gradient is ``sum_t a_t grad L_t`` with ``a_t = z_t / (c (L_t - m_t))``: the terms
    returned are ``a_t L_t`` with ``a`` computed from the detached (global-batch) losses, which
    gives exactly that gradient and keeps every task's gradient separate for the statistics.

    After the model's step, the losses of the same batch are evaluated again without gradients
    (``opt.step(closure)``, the closure returning the T losses: one extra forward per step,
    FAMO's cost); ``w`` then takes an Adam step (``lr``, weight decay ``gamma``) on
    ``J_softmax(w)^T (log L_prev - log L_new)`` (Alg. 1, lines 6-7). Nothing is clipped here
    (FAMO's reference trainer clips before backward, which has no effect; not copied).
    """

    name = "famo"
    display = "FAMO"
    paper = "Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023"
    Options = FAMOOptions
    needs_closure = True
    order = 30

    def setup(self, T: int, device: torch.device) -> None:
        super().setup(T, device)
        o = self.options
        self.w = torch.zeros(T, device=device, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=o.lr, weight_decay=o.gamma)
        self.min_losses = torch.zeros(T, device=device)
        self._prev: torch.Tensor | None = None

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor, ctx: StepContext
              ) -> list[torch.Tensor]:
        eps = self.options.eps
        with torch.no_grad():
            z = torch.softmax(self.w, dim=0)
            D = values.float() - self.min_losses + eps
            c = (z / D).sum()
            a = z / (c * D)
        self._prev = values.detach().float()
        return [a[t] * loss for t, loss in enumerate(losses)]

    def after_step(self, new_values: torch.Tensor) -> None:
        if self._prev is None:
            raise RuntimeError("FAMO.after_step: called before terms()")
        eps = self.options.eps
        delta = (self._prev - self.min_losses + eps).log() - \
            (new_values.float() - self.min_losses + eps).log()
        with torch.enable_grad():
            d, = torch.autograd.grad(torch.softmax(self.w, dim=0), self.w, grad_outputs=delta)
        self.opt.zero_grad()
        self.w.grad = d
        self.opt.step()
        self._prev = None

    def loss_weights(self) -> torch.Tensor:
        return torch.softmax(self.w.detach(), dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.opt.load_state_dict(state["opt"])
