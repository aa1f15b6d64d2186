"""Where :class:`~gradops.optim.mtl.MTLOptimizer`'s per-task backward passes start, and which
parameters the tasks share: walks of the autograd graph behind the task losses (with
:mod:`gradops.optim._graph`).

- :func:`task_roots`: the ``T`` backward roots of a step and their seeds; a 1-D loss tensor made
  by ``torch.stack`` is split at the stack, so task ``t``'s pass does not run through the other
  tasks' graphs.
- :func:`resolve_shared`: the shared parameters, from ``shared=`` (parameters or modules) or, with
  ``shared="auto"``, the parameters that more than one task's loss reaches (first step only).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from ._graph import leaf_uses

__all__ = ["as_params", "modules_of", "reached_leaves", "resolve_shared", "stack_node",
           "task_roots"]


def as_params(shared: Any) -> list[torch.Tensor]:
    """The parameters in a ``shared`` argument (a module or tensor, or a sequence of them)."""
    if isinstance(shared, (nn.Module, torch.Tensor)):
        shared = [shared]
    out: list[torch.Tensor] = []
    for item in shared:
        if isinstance(item, nn.Module):
            out.extend(item.parameters())
        elif isinstance(item, torch.Tensor):
            out.append(item)
        else:
            raise TypeError(f"MTLOptimizer: shared must hold parameters or modules, got "
                            f"{type(item).__name__}")
    return out


def modules_of(shared: Any) -> list[nn.Module]:
    """The modules in a ``shared`` argument (a module, or a list / tuple holding some)."""
    if isinstance(shared, nn.Module):
        return [shared]
    if isinstance(shared, (list, tuple)):
        return [m for m in shared if isinstance(m, nn.Module)]
    return []


def reached_leaves(root: torch.Tensor | GradientEdge) -> set[int]:
    """ids of the leaf tensors whose AccumulateGrad nodes the graph of ``root`` reaches."""
    return set(leaf_uses([root]))


def resolve_shared(shared: Any, params: list[torch.Tensor],
                   roots: Sequence[torch.Tensor | GradientEdge], separate: bool = True
                   ) -> list[torch.Tensor]:
    """The shared parameters among ``params`` (the inner optimizer's trainable parameters, whose
    order they keep): those of ``shared`` (parameters or modules), or with ``shared="auto"`` those
    that more than one of ``roots`` reaches (all of them reached, for a single task), which needs
    ``separate`` roots (:func:`task_roots`)."""
    if isinstance(shared, str):
        if shared != "auto":
            raise ValueError(f"MTLOptimizer: shared must be parameters, modules or 'auto', "
                             f"got {shared!r}")
        if not separate:
            raise ValueError("MTLOptimizer.backward: shared='auto' needs the losses as a list "
                             "or a torch.stack of the task losses (this 1-D tensor mixes them "
                             "in its graph); pass shared= explicitly")
        hits: dict[int, int] = {}
        for r in roots:
            for i in reached_leaves(r):
                hits[i] = hits.get(i, 0) + 1
        need = 2 if len(roots) > 1 else 1
        found = [p for p in params if hits.get(id(p), 0) >= need]
        if not found:
            raise ValueError("MTLOptimizer: shared='auto' found no parameter reached by more "
                             "than one task's loss; pass shared= explicitly")
        return found
    wanted = {id(p) for p in as_params(shared)}
    known = {id(p) for p in params}
    missing = wanted - known
    if missing:
        raise ValueError(f"MTLOptimizer: {len(missing)} shared parameter(s) are not "
                         "(trainable) parameters of the inner optimizer")
    return [p for p in params if id(p) in wanted]          # the optimizer's order


# per-element operations with one differentiable input that may sit between torch.stack and the
# losses handed to backward (GradScaler.scale, casts, a constant factor)
_ELEMENTWISE = frozenset({"MulBackward0", "DivBackward0", "ToCopyBackward0", "CloneBackward0",
                          "AliasBackward0"})


def stack_node(losses: torch.Tensor):
    """The ``StackBackward0`` node that made the 1-D ``losses`` (through per-element ops with a
    single differentiable input), or None."""
    fn = losses.grad_fn
    while fn is not None and type(fn).__name__ in _ELEMENTWISE:
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return None
        fn = nxt[0]
    if fn is None or type(fn).__name__ != "StackBackward0":
        return None
    if len(fn.next_functions) != losses.numel() or any(f is None for f, _ in fn.next_functions):
        return None
    return fn


def task_roots(losses: Any) -> tuple[list[torch.Tensor | GradientEdge], list[torch.Tensor],
                                     torch.Tensor, bool]:
    """The T backward roots, their seeds, the detached loss values ``[T]``, and whether the
    roots are separate per task (False: each root reaches every task's graph).

    A 1-D loss tensor made by ``torch.stack`` (possibly followed by per-element scaling or
    casts, e.g. ``GradScaler.scale``) is split at the stack: root t is the stack's input t,
    with seed ``d losses[t] / d stacked[t]``, so task t's backward does not run through the
    other tasks' graphs. Other 1-D tensors fall back to ``losses[t]``, whose backward passes
    run through all the graphs (correct, slower; ``shared="auto"`` is refused then)."""
    if isinstance(losses, torch.Tensor):
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(f"MTLOptimizer.backward: losses must be a list or a 1-D tensor of "
                             f"T >= 1 task losses, got shape {tuple(losses.shape)}")
        if not losses.requires_grad:
            raise ValueError("MTLOptimizer.backward: losses do not require grad")
        values = losses.detach()
        stack = stack_node(losses)
        if stack is not None:
            roots = [GradientEdge(f, nr) for f, nr in stack.next_functions]
            if stack is losses.grad_fn:
                seed = torch.ones_like(values)
            else:
                seed, = torch.autograd.grad(losses, GradientEdge(stack, 0),
                                            grad_outputs=torch.ones_like(losses),
                                            retain_graph=True)
            return roots, list(seed.unbind()), values, True
        roots = [losses[t] for t in range(losses.numel())]
        return roots, [torch.ones_like(r) for r in roots], values, False
    roots = list(losses)
    if not roots:
        raise ValueError("MTLOptimizer.backward: losses is empty")
    for t, l in enumerate(roots):
        if not isinstance(l, torch.Tensor) or l.numel() != 1:
            raise ValueError(f"MTLOptimizer.backward: losses[{t}] must be a scalar tensor")
        if not l.requires_grad:
            raise ValueError(f"MTLOptimizer.backward: losses[{t}] does not require grad")
    values = torch.stack([l.detach().reshape(()) for l in roots])
    return roots, [torch.ones_like(r) for r in roots], values, True
