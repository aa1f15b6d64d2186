"""The buffer layout of :class:`~gradops.optim.mtl.MTLOptimizer` (docs/optim.md, "The data
path"): the shared parameters, their offsets in one flat column space of ``P`` entries, and the
two flat buffers over it, in the parameters' dtype:

- ``J`` ``[T, P]``: row ``t`` is task ``t``'s gradient of all shared entries, one slice per
  parameter (allocated on the first step that needs it, never zeroed);
- ``g`` ``[P]``: the combined gradient, whose views are the shared parameters' ``.grad``.

Fixed on the first step (:meth:`MTLOptimizer.backward`), then reused every step.
"""
from __future__ import annotations

import torch

from ..segments import offsets_from_numels
from .sparse_training import SparseTraining

__all__ = ["Layout", "layout_attr"]


class Layout:
    """The shared parameters of ``T`` tasks and the flat buffers laid out over them.

    Args:
        shared: the shared parameters (one dtype, one device), in the optimizer's order.
        params: the inner optimizer's trainable parameters; those not in ``shared`` are the
            task-specific ones (:attr:`specific`).
        T: the number of tasks.
        combined: whether to allocate ``g`` (GradDrop's fused pass returns a fresh combined
            gradient each step, so it needs none: no idle second copy).
        inner: the inner optimizer; a :class:`SparseTraining` gives :attr:`keep`.

    Attributes:
        shared, specific: the parameters; ``T``, ``P``, ``L``: tasks, shared entries, shared
            parameters; ``device``, ``dtype``: the shared parameters'.
        offsets_cpu, offsets: the segment table ``[L + 1]`` of the parameters in ``J``'s columns
            (on the CPU, and on the parameters' device); ``bounds``: the same, as ints.
        J, J_views: ``[T, P]`` (None until :meth:`buffer`) and its per-row parameter views.
        g, g_views: ``[P]`` (None without ``combined``) and its parameter views.
        keep: ``[P]`` 0/1 of the trainable entries under sparse training, or None.
    """

    def __init__(self, shared: list[torch.Tensor], params: list[torch.Tensor], T: int,
                 combined: bool, inner: torch.optim.Optimizer):
        dtypes = {p.dtype for p in shared}
        devices = {p.device for p in shared}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"MTLOptimizer: shared parameters must share one dtype and device, "
                             f"got {sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        self.device, self.dtype = shared[0].device, shared[0].dtype
        self.shared = shared
        ids = {id(p) for p in shared}
        self.specific = [p for p in params if id(p) not in ids]
        self.offsets_cpu = offsets_from_numels([p.numel() for p in shared])
        self.offsets = self.offsets_cpu.to(self.device)
        self.bounds: list[int] = self.offsets_cpu.tolist()
        self.T, self.P, self.L = T, self.bounds[-1], len(shared)
        self.J: torch.Tensor | None = None          # allocated by buffer() on first use
        self.J_views: list[list[torch.Tensor]] = []
        self.g = torch.zeros(self.P, dtype=self.dtype, device=self.device) if combined else None
        self.g_views = [] if self.g is None else self.views(self.g)
        self.keep = self._sparse_keep(inner)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat ``[P]`` tensor, one per shared parameter, in its shape."""
        b = self.bounds
        return [flat[x:y].view_as(p) for p, x, y in zip(self.shared, b[:-1], b[1:])]

    def buffer(self) -> torch.Tensor:
        """The ``[T, P]`` buffer ``J`` and its per-row views of the parameters, allocated once, on
        the first step that needs it (never, while the Linear engine takes every shared
        parameter). Each step writes every row it uses in full, so it is not zeroed."""
        if self.J is None:
            self.J = torch.zeros(self.T, self.P, dtype=self.dtype, device=self.device)
            self.J_views = [self.views(self.J[t]) for t in range(self.T)]
        return self.J

    def _sparse_keep(self, inner: torch.optim.Optimizer) -> torch.Tensor | None:
        """``[P]`` 0/1 of the trainable entries of the shared parameters under sparse training."""
        if not isinstance(inner, SparseTraining):
            return None
        masks = {id(p): inner.trainable_mask(p) for p in self.shared}
        if all(m is None for m in masks.values()):
            return None
        keep = torch.ones(self.P, dtype=self.dtype, device=self.device)
        for p, a, b in zip(self.shared, self.bounds[:-1], self.bounds[1:]):
            m = masks[id(p)]
            if m is not None:
                keep[a:b] = m.reshape(-1).to(self.dtype)
        return keep


def layout_attr(name: str) -> property:
    """A read-only attribute of an object holding its :class:`Layout` as ``_layout`` (set on the
    first step): the layout's ``name``."""
    return property(lambda self: getattr(self._layout, name), doc=f"``Layout.{name}``")
