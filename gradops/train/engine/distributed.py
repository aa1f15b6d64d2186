"""Multi-process training under ``torchrun`` (``torchrun --nproc_per_node=2 -m gradops train
...``): the process group (gloo on CPU, NCCL on CUDA), which process writes, and small helpers.

Each process trains on its share of every global batch (a ``DistributedSampler``: the global batch
of ``--batch-size`` samples is the same set of samples as in a single-process run); the model is
wrapped in ``DistributedDataParallel`` and handed to
``MTLOptimizer(distributed=Distributed(ddp_model=...))``, which all-reduces the per-task gradients
once per step, so every process runs the method on the global batch's gradients. Rank 0
evaluates and writes the run directory.

BatchNorm: each process normalises with its own share of the batch (DDP's default; the running
statistics are broadcast from rank 0 at every forward). A model with BatchNorm therefore trains
slightly differently from a single process on the same global batch; models without it (``--backbone
mlp``) give the same result up to float rounding.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

__all__ = ["Dist", "setup", "launched_by_torchrun", "exit_process"]


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@dataclass
class Dist:
    """This process's place: ``rank``, ``world``, ``local_rank``; ``enabled`` under torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """Average ``t`` over the processes in place (identity in a single process)."""
        if self.enabled:
            import torch.distributed as dist
            dist.all_reduce(t)
            t.div_(self.world)
        return t

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's ``t`` (same shape on each) concatenated along dim 0."""
        if not self.enabled:
            return t
        import torch.distributed as dist
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def setup(device: torch.device) -> Dist:
    """Join the process group torchrun describes (env://), or a single-process :class:`Dist`."""
    if not launched_by_torchrun():
        return Dist()
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, True)


def exit_process(code: int) -> None:
    """End a torchrun worker without the interpreter's teardown: with torch 2.14 and gloo, about
    one exit in ten aborts there after the work is done ("terminate called without an active
    exception"), which torchrun reports as a failure of the whole job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
