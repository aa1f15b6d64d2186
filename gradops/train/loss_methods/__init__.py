"""Loss-level multi-task methods: they reweight the task losses (the gradient methods of
:class:`gradops.optim.MTLOptimizer` then see the reweighted per-task terms, with method ``ew``).

Each method turns the T task losses into T per-task terms whose sum is the loss to minimise;
their gradients are those of the method's paper. State (log-variances, loss history, FAMO's
logits and its optimizer) is in ``state_dict()`` and saved in checkpoints.
"""
from __future__ import annotations

import torch

from .base import LossMethod
from .dwa import DWA
from .famo import FAMO
from .uw import UW

__all__ = ["LossMethod", "UW", "DWA", "FAMO", "make_loss_method"]


def make_loss_method(name: str, T: int, device: torch.device, *, dwa_temperature: float = 2.0,
                     famo_lr: float = 0.025, famo_gamma: float = 0.001) -> LossMethod:
    """The loss-level method ``name`` (``uw``, ``dwa`` or ``famo``) for ``T`` tasks."""
    if name == "uw":
        return UW(T, device)
    if name == "dwa":
        return DWA(T, device, temperature=dwa_temperature)
    if name == "famo":
        return FAMO(T, device, lr=famo_lr, gamma=famo_gamma)
    raise ValueError(f"make_loss_method: unknown method {name!r}; valid: uw, dwa, famo")
