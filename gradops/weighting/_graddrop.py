"""GradDrop as a registered method: the fused pass over ``J`` of :func:`gradops.graddrop`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ops.graddrop import DEFAULT_EPS, _draw_seed, _graddrop_raw
from ._registry import ElementwiseMethod, Options, StepContext, register

__all__ = ["GradDrop", "GradDropOptions"]


@dataclass(frozen=True)
class GradDropOptions(Options):
    leak: Any = 0.0                 # leak_t in [0, 1]: a float for all tasks, or T floats
    eps: float = DEFAULT_EPS        # relative: p = 0.5 (1 + S / ((1 + eps) A))

    def check(self) -> None:
        leak = self.leak
        if isinstance(leak, torch.Tensor):
            leak = leak.detach().cpu().reshape(-1).tolist()
        if isinstance(leak, (list, tuple)):
            leak = tuple(float(x) for x in leak)
            object.__setattr__(self, "leak", leak)
            values = leak
        elif isinstance(leak, (int, float)) and not isinstance(leak, bool):
            object.__setattr__(self, "leak", float(leak))
            values = (float(leak),)
        else:
            self.fail("leak", f"must be a float or a sequence of T floats, got {leak!r}")
        if not values or not all(0.0 <= v <= 1.0 for v in values):
            self.fail("leak", f"must be in [0, 1], got {self.leak!r}")
        self.check_nonnegative("eps")


@register
class GradDrop(ElementwiseMethod):
    """GradDrop (Chen et al., NeurIPS 2020, Eq. 1-3): per parameter entry, keep the tasks whose
    gradient sign agrees with a sign drawn by the entry's purity; one fused pass over ``J``
    (:func:`gradops.graddrop`), seeded from the optimizer's generator."""

    name = "graddrop"
    display = "GradDrop"
    paper = ("Chen et al., Just Pick a Sign: Optimizing Deep Multitask Models with Gradient "
             "Sign Dropout, NeurIPS 2020")
    Options = GradDropOptions
    random = True
    order = 10

    def __init__(self, options: GradDropOptions | None = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self._leak: torch.Tensor | None = None

    def leak_tensor(self, T: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``leak`` as ``[T]`` on ``device`` (checked against ``T`` on first use).

        Args:
            T: the number of tasks.
            device: the device of the result.
            dtype: its dtype.

        Returns:
            The leak coefficients ``[T]`` (cached until ``T``, device or dtype change).

        Raises:
            ValueError: for a per-task ``leak`` whose length is not ``T``.
        """
        lt = self._leak
        if lt is None or lt.shape != (T,) or lt.device != device or lt.dtype != dtype:
            leak = torch.as_tensor(self.options.leak, dtype=torch.float32)
            if leak.dim() == 1 and leak.shape != (T,):
                raise ValueError(f"MTLOptimizer: graddrop leak must be a float or [T] = [{T}] "
                                 f"values, got {leak.numel()}")
            lt = self._leak = leak.expand(T).contiguous().to(device, dtype)
        return lt

    def combine(self, J: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        seed = _draw_seed(ctx.generator, J.device)
        leak = self.leak_tensor(J.shape[0], J.device, ctx.dtype)
        return _graddrop_raw(J, leak, seed, None, False, float(self.options.eps))[0]

    def torchjd(self, T: int):
        from torchjd.aggregation import GradDrop as TorchJDGradDrop
        return TorchJDGradDrop()
