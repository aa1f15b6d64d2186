"""The ``T`` per-task backward passes of :class:`~gradops.optim.mtl.MTLOptimizer`: task ``t``'s
gradient of each shared parameter lands in its slice of row ``t`` of ``J`` (a gradient hook),
the task-specific parameters accumulate the sum of their tasks' gradients in their ``.grad``
(docs/optim.md, "The data path")."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.graph import GradientEdge

from .._backend import _C
from ._layout import Layout
from ._linear_engine import LinearEngine

__all__ = ["per_task_backward"]


def per_task_backward(layout: Layout, roots: Sequence[torch.Tensor | GradientEdge],
                      seeds: Sequence[torch.Tensor], retain_graph: bool,
                      engine: LinearEngine | None = None) -> bool:
    """Task t's gradients of the shared parameters land in row t of ``J``; the task-specific
    parameters' gradients accumulate into their ``.grad`` as in a plain backward.

    Each task runs one ``torch.autograd.backward`` with the shared parameters' ``.grad`` unset,
    so autograd hands each parameter its freshly computed gradient without a copy; a
    post-accumulate-grad hook then copies it into its slice of ``J[t]`` while it is still in
    cache and drops it (``p.grad = None``), so the next parameter's gradient reuses the same
    memory. That one copy replaces the read-modify-write accumulation into ``.grad`` that
    a plain backward does for every task after the first: ``J`` is never zeroed or
    accumulated into. On CPU the copy writes ``J`` with non-temporal stores
    (``gradops._C.stream_copy_cpu``): ``J`` is far larger than the cache and not read before
    the Gram pass, so its lines are written once instead of read, then written. (Copying a
    task's gradients together at the end of its backward, one parallel region per task, was
    measured slower here: the gradients are no longer in cache by then.) Slices of
    parameters that task t does not reach are zero-filled. The hooks live only for the
    duration of this call.

    With ``engine`` (the Linear engine, :mod:`gradops.optim._linear_engine`) taking layers this
    step (the return value: whether it does), the weights and biases of its active layers are
    not backward inputs: the gradient edges of the layers' outputs are, so each pass computes
    the layers' output gradients (which the engine's hooks copy) but not their weight
    gradients, and their columns of ``J`` are left alone."""
    T = len(roots)
    use_engine = engine is not None and engine.begin(roots, T) > 0
    try:
        _passes(layout, roots, seeds, retain_graph, engine if use_engine else None)
    finally:
        if engine is not None:
            engine.end()
    return use_engine


def _passes(layout: Layout, roots: Sequence[torch.Tensor | GradientEdge],
            seeds: Sequence[torch.Tensor], retain_graph: bool,
            engine: LinearEngine | None) -> None:
    """The ``T`` passes of :func:`per_task_backward` (``engine``: one that took layers)."""
    T = len(roots)
    shared, specific = layout.shared, layout.specific
    skip = engine.covered() if engine is not None else set()   # in factored form instead
    via_j = [i for i in range(len(shared)) if i not in skip]
    inputs = [shared[i] for i in via_j] + specific + (engine.edges() if skip else [])
    if via_j:
        layout.buffer()
    rows = layout.J_views
    filled = [False] * len(shared)
    current: list[torch.Tensor] = []
    stream = _C is not None and shared[0].device.type == "cpu"

    def make_hook(i: int):
        def hook(p: torch.Tensor) -> None:
            g, dst = p.grad, current[i]
            if stream and g.layout == torch.strided and g.is_contiguous() and \
                    g.dtype == dst.dtype:
                _C.stream_copy_cpu(dst, g)
            else:                                # e.g. channels-last weights, CUDA
                dst.copy_(g)
            filled[i] = True
            p.grad = None
        return hook

    for p in shared:
        p.grad = None
    handles = [shared[i].register_post_accumulate_grad_hook(make_hook(i)) for i in via_j]
    try:
        for t in range(T):
            current[:] = rows[t] if via_j else []
            filled[:] = [False] * len(shared)
            if engine is not None:
                engine.task = t
            torch.autograd.backward(roots[t], grad_tensors=seeds[t], inputs=inputs,
                                    retain_graph=retain_graph or t < T - 1)
            for i in via_j:
                if not filled[i]:                # task t does not reach shared[i]
                    current[i].zero_()
            if engine is not None:
                engine.after_task(t)
    finally:
        for h in handles:
            h.remove()
