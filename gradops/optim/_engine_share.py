"""The Linear engine's share of :class:`~gradops.optim.mtl.MTLOptimizer`'s Gram and combine
stages: on a step where the engine (:mod:`gradops.optim._linear_engine`) took some layers, their
Grams and combined gradients come from their factors, and the runs of shared parameters no
active layer covers from their columns of ``J`` (docs/optim.md, "The factored engine")."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.combine import combine
from ..ops.gram import gram, segment_gram
from ._layout import Layout
from ._linear_engine import MODES, LinearEngine, describe

__all__ = ["describe_factored", "engine_combine", "engine_gram", "engine_layer_grams",
           "linear_engine", "uncovered_runs"]


def linear_engine(mode: str, modules: list[nn.Module], params: list[torch.Tensor],
                  distributed: bool, sparse: bool, fused: bool) -> LinearEngine | None:
    """The engine for ``linear_gram=mode`` over the layers in ``modules`` (none: found on the
    first step's forward among the modules owning ``params``), or None where it is not used:
    ``"off"``, with a process group (``distributed``), sparse masks (which mask ``J``) or a
    method with a fused pass over ``J`` (``fused``: GradDrop). ``"on"`` is refused with a process
    group or sparse masks."""
    if mode not in MODES:
        raise ValueError(f"MTLOptimizer: linear_gram must be one of {MODES}, got {mode!r}")
    why = ("it runs in single-process training only (a process group averages gradients over "
           "the ranks)" if distributed else "sparse masks mask J" if sparse else None)
    if mode == "on" and why:
        raise ValueError(f"MTLOptimizer: linear_gram='on' cannot be used here: {why}")
    if mode == "off" or why or fused:
        return None
    return LinearEngine(modules, mode, params)


def describe_factored(engine: LinearEngine | None, ready: bool) -> str:
    """The layers the engine's last step took, for ``repr`` (``ready``: after the first step)."""
    if engine is None:
        return "[]"
    if not ready:
        return "(decided on the first step)"
    names = [f"{l.name or f'shared[{l.w_index}]'}: {describe(l.module)}"
             for l in engine.last_taken]
    return f"[{', '.join(names)}] of {len(engine.layers)} Linear/Conv2d layers"


def uncovered_runs(engine: LinearEngine, L: int) -> list[tuple[int, int]]:
    """Runs ``[i0, i1)`` of consecutive shared parameters (of ``L``) no active layer covers."""
    covered = engine.covered()
    runs, i0 = [], None
    for i in range(L + 1):
        if i < L and i not in covered:
            i0 = i if i0 is None else i0
        elif i0 is not None:
            runs.append((i0, i))
            i0 = None
    return runs


def _run_offsets(layout: Layout, i0: int, i1: int) -> torch.Tensor:
    """The segment table of shared parameters ``[i0, i1)`` within their columns of ``J``."""
    return layout.offsets_cpu[i0:i1 + 1] - layout.offsets_cpu[i0]


def engine_gram(layout: Layout, J: torch.Tensor | None, engine: LinearEngine,
                runs: list[tuple[int, int]]) -> torch.Tensor:
    """``G = J J^T``: active factored layers from their factors, the other ``runs`` of
    parameters from ``J``."""
    b = layout.bounds
    parts = [G for l in engine.active() for _, G in engine.param_grams(l)]
    parts += [gram(J[:, b[i0]:b[i1]]) for i0, i1 in runs if b[i1] > b[i0]]
    return torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]


def engine_layer_grams(layout: Layout, J: torch.Tensor | None, engine: LinearEngine,
                       runs: list[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
    """Per-parameter Grams ``[L, T, T]`` in ``dtype``: active factored layers from their
    factors, the other ``runs`` of parameters from ``J``."""
    b = layout.bounds
    Gl = torch.zeros(layout.L, layout.T, layout.T, dtype=dtype, device=layout.device)
    for l in engine.active():
        for i, G in engine.param_grams(l):
            Gl[i] = G
    for i0, i1 in runs:
        Gl[i0:i1] = segment_gram(J[:, b[i0]:b[i1]], _run_offsets(layout, i0, i1))
    return Gl


def engine_combine(layout: Layout, engine: LinearEngine, J: torch.Tensor | None,
                   w: torch.Tensor, g: torch.Tensor, runs: list[tuple[int, int]]) -> None:
    """``g = w^T J`` (per parameter for ``[L, T]`` weights): active factored layers from their
    factors, the other ``runs`` of parameters from ``J``."""
    b, per = layout.bounds, w.dim() == 2
    views = layout.g_views
    for l in engine.active():
        bi = l.b_index
        engine.combine_into(l, w[l.w_index] if per else w,
                            None if bi is None else (w[bi] if per else w),
                            views[l.w_index], None if bi is None else views[bi])
    for i0, i1 in runs:
        if b[i1] == b[i0]:
            continue
        if per:
            combine(J[:, b[i0]:b[i1]], w[i0:i1], _run_offsets(layout, i0, i1),
                    out=g[b[i0]:b[i1]])
        else:
            combine(J[:, b[i0]:b[i1]], w, out=g[b[i0]:b[i1]])
