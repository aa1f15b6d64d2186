"""Gradient averaging over a process group for :class:`~gradops.optim.mtl.MTLOptimizer`.

With ``sync="global"`` the optimizer all-reduces its ``[T, P]`` per-task buffer once per step
(instead of DDP's ``T`` reductions, one per backward pass), so the method sees the global
batch's per-task gradients; the task-specific parameters' ``.grad`` are averaged the same way.
With ``sync="local"`` the combined gradient is averaged instead.

The options come grouped as one :class:`Distributed` (``MTLOptimizer(..., distributed=...)``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Distributed", "GradientSync", "distributed_from", "gradient_sync", "process_group_of"]


@dataclass(frozen=True)
class Distributed:
    """The distributed options of :class:`~gradops.optim.MTLOptimizer`, as one argument::

        opt = MTLOptimizer(inner, method="pcgrad", shared=model.module.encoder,
                           distributed=gradops.optim.Distributed(ddp_model=model))

    Attributes:
        ddp_model: a :class:`~torch.nn.parallel.DistributedDataParallel` model: its reducer is
            switched off (``require_backward_grad_sync = False``) when the optimizer is built,
            and the optimizer all-reduces the per-task buffer once per step instead of ``T``
            times; implies its process group.
        process_group: a process group for a plain (not DDP-wrapped) model: gradients are
            averaged over its ranks (as DDP does) before the method.
        sync: ``"global"`` (default): all-reduce the per-task gradients, then run the method on
            the global batch's gradients (equal to single-process training on the global batch);
            ``"local"``: run the method per rank and average the combined gradients (cheaper
            traffic, a different method: documented, not equal to the global one).
        bucket_mb: all-reduce bucket size in MiB (> 0).

    ``Distributed()`` (all defaults) is single-process training.
    """

    ddp_model: nn.Module | None = None
    process_group: Any = None
    sync: str = "global"
    bucket_mb: float = 25.0

    def __post_init__(self) -> None:
        if self.sync not in ("global", "local"):
            raise ValueError(f"Distributed: sync must be 'global' or 'local', got {self.sync!r}")
        b = self.bucket_mb
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (
                math.isfinite(b) and b > 0):
            raise ValueError(f"Distributed: bucket_mb must be a finite number > 0, got {b!r}")


def distributed_from(distributed: Distributed | None, **legacy: Any) -> Distributed:
    """``distributed=``, or (deprecated, for one release) the same options from the keywords
    ``ddp_model=``, ``process_group=``, ``sync=``, ``bucket_mb=`` (those in ``legacy`` that are
    not None), with a :class:`DeprecationWarning` naming the new form."""
    given = {k: v for k, v in legacy.items() if v is not None}
    if distributed is not None and not isinstance(distributed, Distributed):
        raise TypeError(f"MTLOptimizer: distributed must be a gradops.optim.Distributed, got "
                        f"{type(distributed).__name__}")
    if not given:
        return Distributed() if distributed is None else distributed
    names = ", ".join(f"{k}=" for k in given)
    if distributed is not None:
        raise ValueError(f"MTLOptimizer: pass distributed= alone, not together with {names}")
    warnings.warn(f"MTLOptimizer: {names} {'is' if len(given) == 1 else 'are'} deprecated and "
                  f"will be removed in the next release; pass distributed=gradops.optim."
                  f"Distributed({', '.join(f'{k}=...' for k in given)}) instead",
                  DeprecationWarning, stacklevel=3)
    return Distributed(**given)


def process_group_of(ddp_model: nn.Module | None, process_group: Any) -> Any:
    """The process group to average over: ``ddp_model``'s (its reducer is switched off, as this
    optimizer reduces instead), else ``process_group`` (None: single process)."""
    if ddp_model is None:
        return process_group
    if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        raise TypeError("MTLOptimizer: ddp_model must be a DistributedDataParallel module")
    ddp_model.require_backward_grad_sync = False   # its reducer stays idle; we reduce
    return ddp_model.process_group


def gradient_sync(options: Distributed) -> GradientSync | None:
    """The averaging over ``options``' process group (:func:`process_group_of`, which switches a
    DDP model's reducer off), or None for single-process training."""
    group = process_group_of(options.ddp_model, options.process_group)
    return None if group is None else GradientSync(group, int(options.bucket_mb * 2**20))


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
