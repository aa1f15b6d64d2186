"""Smooth Tchebycheff scalarisation (Lin, Zhang, Yang, Liu, Liu & Zhang, "Smooth Tchebycheff
Scalarization for Multi-Objective Optimization", ICML 2024)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._registry import LossMethod, Options, StepContext, register

__all__ = ["STCH", "STCHOptions"]


@dataclass(frozen=True)
class STCHOptions(Options):
    mu: float = 1.0                 # the smoothing parameter mu (LibMTL's STCH_mu)
    warmup_epoch: int = 4           # the 0-based epoch whose mean losses are the nadir point
    eps: float = 1e-20              # inside the logs, as LibMTL

    def check(self) -> None:
        if not self.mu > 0:
            self.fail("mu", f"must be > 0, got {self.mu}")
        if self.warmup_epoch < 0:
            self.fail("warmup_epoch", f"must be >= 0, got {self.warmup_epoch}")
        if not self.eps >= 0:
            self.fail("eps", f"must be >= 0, got {self.eps}")


@register
class STCH(LossMethod):
    """The smooth Tchebycheff scalarisation ``mu log sum_t exp(lambda_t (f_t - z_t) / mu)``
    in the multi-task form of LibMTL's ``STCH`` (modified from the authors' ``STCH_MTL``),
    kept step for step:

    - epochs ``0 .. warmup_epoch``: the loss is ``sum_t log(L_t + eps)``; during epoch
      ``warmup_epoch`` the per-step losses are averaged into the nadir point ``n`` (LibMTL's
      ``average_loss / average_loss_count``);
    - from epoch ``warmup_epoch + 1``: with ``l_t = log(L_t / n_t + eps)`` (``lambda = 1``,
      ``z = 0`` on the log-normalised losses) the loss is ``T mu logsumexp_t(l_t / mu)``
      (LibMTL's factor ``T`` kept).

    Its gradient is ``sum_t a_t grad L_t`` with ``a_t = 1 / (L_t + eps)`` in the warm-up and
    ``a_t = T softmax_t(l / mu) / (L_t + eps n_t)`` after: the terms returned are ``a_t L_t``
    with ``a`` from the detached (global-batch, unscaled) losses, the same gradient, per task,
    and correctly scaled under AMP. Epochs are counted by ``MTLOptimizer.end_epoch()`` calls
    (LibMTL's ``self.epoch``); the nadir is LibMTL's mean of the warm-up epoch's per-step losses
    (accumulated here, whatever ``end_epoch`` is given).

    Scale convention: LibMTL's, whose learning rates carry over (the factor ``T`` makes the
    weights ``T softmax`` sum to ``T``, as the warm-up's log losses); TorchJD has no STCH.
    Losses must be positive (logs). State: the epoch count, the warm-up sums and count, the
    nadir point ``[T]``. Cost: none beyond the losses."""

    name = "stch"
    display = "STCH"
    paper = ("Lin et al., Smooth Tchebycheff Scalarization for Multi-Objective Optimization, "
             "ICML 2024")
    Options = STCHOptions
    order = 55

    def setup(self, T: int, device: torch.device) -> None:
        super().setup(T, device)
        self.epoch = 0
        self.loss_sum = torch.zeros(T, device=device)
        self.loss_count = 0
        self.nadir: torch.Tensor | None = None
        self._w: torch.Tensor | None = None

    def coefficients(self, values: torch.Tensor) -> torch.Tensor:
        """This step's ``a [T]`` from the detached losses (updates the warm-up sums).

        Args:
            values: the detached, unscaled losses ``[T]``.

        Returns:
            ``a [T]``.
        """
        o = self.options
        v = values.detach()
        if self.epoch <= o.warmup_epoch:
            if self.epoch == o.warmup_epoch:
                self.loss_sum = self.loss_sum.to(v) + v
                self.loss_count += 1
            return 1.0 / (v + o.eps)
        n = self.nadir.to(v)
        l = torch.log(v / n + o.eps)
        return self.T * torch.softmax(l / o.mu, dim=0) / (v + o.eps * n)

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor, ctx: StepContext
              ) -> list[torch.Tensor]:
        a = self._w = self.coefficients(values)
        return [a[t].to(loss.dtype) * loss for t, loss in enumerate(losses)]

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        if self.epoch == self.options.warmup_epoch:
            if self.loss_count == 0:
                raise RuntimeError("STCH.end_epoch: no step ran in the warm-up epoch "
                                   f"{self.epoch}: no nadir point")
            self.nadir = self.loss_sum / self.loss_count
        self.epoch += 1

    def loss_weights(self) -> torch.Tensor | None:
        return self._w

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loss_sum": self.loss_sum.clone(),
                "loss_count": self.loss_count,
                "nadir": None if self.nadir is None else self.nadir.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = self.loss_sum.device
        self.epoch = int(state["epoch"])
        self.loss_sum = state["loss_sum"].to(dev)
        self.loss_count = int(state["loss_count"])
        self.nadir = None if state["nadir"] is None else state["nadir"].to(dev)
