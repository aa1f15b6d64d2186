"""Walks of the autograd graph behind the task losses (first step only: ``shared="auto"`` and the
Linear engine's check for tied parameters)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch.autograd.graph import GradientEdge


def leaf_uses(roots: Iterable[torch.Tensor | GradientEdge]) -> dict[int, int]:
    """``id(leaf) -> number of graph edges into its AccumulateGrad node`` over the graphs of
    ``roots`` (a root that is itself such a node counts as one edge; a leaf tensor root as one
    use of itself)."""
    stack, uses = [], {}

    def count(var) -> None:
        uses[id(var)] = uses.get(id(var), 0) + 1

    for r in roots:
        if isinstance(r, GradientEdge):
            stack.append(r.node)
            if getattr(r.node, "variable", None) is not None:
                count(r.node.variable)
        elif r.grad_fn is not None:
            stack.append(r.grad_fn)
        elif r.requires_grad:
            count(r)
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for f, _ in node.next_functions:
            if f is None:
                continue
            var = getattr(f, "variable", None)
            if var is not None:
                count(var)
            stack.append(f)
    return uses
