"""The optimizers of a training run from its configuration, shared by the
:class:`~gradops.train.engine.trainer.Trainer` and Recon's conflict comparison
(:func:`gradops.train.recon.search.conflict_table`): the inner optimizer (``--optim``) and the
:class:`gradops.optim.MTLOptimizer` wrapped around it (``--method`` and its options, sparse
training, AMP's GradScaler, DDP).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...optim import Distributed, MTLOptimizer
from ..config.method_options import method_options
from ..config.schema import TrainConfig

__all__ = ["inner_optimizer", "mtl_optimizer"]


def inner_optimizer(cfg: TrainConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """``--optim`` (adam, adamw or sgd) over ``params`` at ``--lr``, ``--weight-decay`` (and
    ``--momentum`` for sgd)."""
    c = cfg
    if c.optim == "adam":
        return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
    if c.optim == "adamw":
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)


def mtl_optimizer(cfg: TrainConfig, inner: torch.optim.Optimizer,
                  encoder: nn.Module | list[torch.Tensor], masks: Any,
                  scaler: torch.amp.GradScaler | None,
                  ddp: nn.parallel.DistributedDataParallel | None,
                  num_tasks: int | None = None) -> MTLOptimizer:
    """``inner`` wrapped in :class:`~gradops.optim.MTLOptimizer` for ``cfg.method`` with its
    ``--method-opt`` options (a loss-level method turns the losses into its terms inside the
    optimizer; one with parameters, UW, needs ``num_tasks``) over the shared ``encoder``, with
    the sparse-training ``masks`` (or None), AMP's ``scaler`` (or None) and the ``ddp`` model
    (or None)."""
    return MTLOptimizer(inner, method=cfg.method, shared=encoder,
                        method_options=method_options(cfg), num_tasks=num_tasks,
                        sparse=masks, module=encoder if masks is not None else None,
                        stats=cfg.stats, grad_scaler=scaler,
                        distributed=Distributed(ddp_model=ddp))
