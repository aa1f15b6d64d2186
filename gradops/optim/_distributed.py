"""Gradient averaging over a process group for :class:`~gradops.optim.mtl.MTLOptimizer`.

With ``sync="global"`` the optimizer all-reduces its ``[T, P]`` per-task buffer once per step
(instead of DDP's ``T`` reductions, one per backward pass), so the method sees the global
batch's per-task gradients; the task-specific parameters' ``.grad`` are averaged the same way.
With ``sync="local"`` the combined gradient is averaged instead.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["GradientSync", "process_group_of"]


def process_group_of(ddp_model: nn.Module | None, process_group: Any) -> Any:
    """The process group to average over: ``ddp_model``'s (its reducer is switched off, as this
    optimizer reduces instead), else ``process_group`` (None: single process)."""
    if ddp_model is None:
        return process_group
    if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        raise TypeError("MTLOptimizer: ddp_model must be a DistributedDataParallel module")
    ddp_model.require_backward_grad_sync = False   # its reducer stays idle; we reduce
    return ddp_model.process_group


class GradientSync:
    """Average tensors and gradients over the ranks of ``process_group``, in buckets of
    ``bucket_bytes``."""

    def __init__(self, process_group: Any, bucket_bytes: int):
        self.process_group = process_group
        self.bucket_bytes = bucket_bytes

    def world(self) -> int:
        import torch.distributed as dist
        return dist.get_world_size(self.process_group)

    def all_reduce_mean(self, flat: torch.Tensor) -> None:
        """Average a contiguous tensor over the ranks, in place."""
        import torch.distributed as dist
        world = self.world()
        v = flat.view(-1)
        step = max(1, self.bucket_bytes // max(1, v.element_size()))
        works = [dist.all_reduce(v[i:i + step], group=self.process_group, async_op=True)
                 for i in range(0, v.numel(), step)]
        for w in works:
            w.wait()
        v.div_(world)

    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Average the ``.grad`` of ``params`` over the ranks (zeros where a rank produced none,
        so that every rank joins the same collectives)."""
        if not params:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch._utils._flatten_dense_tensors(grads)
        self.all_reduce_mean(flat)
        for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(r)
