"""FAMO (Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023)."""
from __future__ import annotations

from typing import Any

import torch

from .base import LossMethod

__all__ = ["FAMO"]


class FAMO(LossMethod):
    """The loss fed to backward is ``sum_t z_t log(L_t - m_t) / c`` with ``z = softmax(w)``,
    ``c = sum_t z_t / (L_t - m_t)`` (``m_t = 0``, the paper's default minimum loss). Its
    gradient is ``sum_t a_t grad L_t`` with ``a_t = z_t / (c (L_t - m_t))``: the terms returned
    are ``a_t L_t`` with ``a`` computed from the detached (global-batch) losses, which gives
    exactly that gradient and keeps every task's gradient separate for the statistics.

    After the model's step, a no-grad forward on the same batch gives the new losses (the
    trainer calls :meth:`after_step`); ``w`` then takes an Adam step (``lr``, weight decay
    ``gamma``) on ``J_softmax(w)^T (log L_prev - log L_new)``. Nothing is clipped here (FAMO's
    reference trainer clips before backward, which has no effect; not copied).
    """

    name = "famo"
    needs_losses_after_step = True

    def __init__(self, T: int, device: torch.device, lr: float = 0.025, gamma: float = 0.001,
                 eps: float = 1e-8):
        self.w = torch.zeros(T, device=device, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)
        self.eps = eps
        self.min_losses = torch.zeros(T, device=device)
        self._prev: torch.Tensor | None = None

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            z = torch.softmax(self.w, dim=0)
            D = values.float() - self.min_losses + self.eps
            c = (z / D).sum()
            a = z / (c * D)
        self._prev = values.detach().float()
        return [a[t] * loss for t, loss in enumerate(losses)]

    def after_step(self, new_values: torch.Tensor) -> None:
        if self._prev is None:
            raise RuntimeError("FAMO.after_step: called before terms()")
        delta = (self._prev - self.min_losses + self.eps).log() - \
            (new_values.float() - self.min_losses + self.eps).log()
        with torch.enable_grad():
            d, = torch.autograd.grad(torch.softmax(self.w, dim=0), self.w, grad_outputs=delta)
        self.opt.zero_grad()
        self.w.grad = d
        self.opt.step()
        self._prev = None

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.w.detach(), dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        with torch.no_grad():
            self.w.copy_(sd["w"])
        self.opt.load_state_dict(sd["opt"])
