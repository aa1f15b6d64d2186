"""The Gram and the combination of ``nn.Linear`` layers from their inputs and output gradients
(:mod:`gradops.ops.linear_gram`), for :class:`~gradops.optim.mtl.MTLOptimizer`.

``J`` is still filled by the per-task backward passes (GradDrop, statistics and every other
layer read it); for an eligible Linear layer the Gram and combine stages read, instead of the
layer's ``T x out x in`` columns of ``J``, its input ``X`` (``[N, in]``, kept by a forward hook)
and task ``t``'s gradient with respect to its output (``[N, out]``, copied by a tensor hook during
task ``t``'s backward into a buffer ``D`` of ``[T, N, out]``, allocated once per batch size).

A layer is used on a step when all of these hold (Python-level checks, no host sync):

- it is a plain ``nn.Linear`` (its own ``forward``) whose weight (and bias, if any) are shared
  parameters, and on the first step the autograd graph reaches the weight and bias only once
  (not tied to another use);
- its forward ran exactly once with grad since the last :meth:`MTLOptimizer.backward`, outside
  ``torch.autocast``, on an input of the weight's dtype;
- the optimizer runs in one process (with a process group, ``sync="global"`` averages ``J``
  over the ranks, which the local activations cannot reproduce; ``sync="local"`` could use the
  engine but is not tested with it) and without sparse-training masks (which mask ``J``);
- ``mode="on"``, or ``mode="auto"`` and the cost model says it is cheaper:
  ``N^2 in + 2 T N^2 out + T^2 N out / 2 + 2 N in out + 8 N^3`` against
  ``(T^2 / 2 + 4 T) in out`` multiply-adds (the products ``L^T D_t`` and the combine's
  ``[out, N] x [N, in]`` product count double: they run as small torch matrix products; the
  direct combine counts 4 per element: it is memory-bound). With ``N = 64`` and
  ``in = out = 1024`` the crossover is near ``T = 22``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from ..ops.linear_gram import _rows_gram, linear_combine, linear_gram

MODES = ("auto", "on", "off")


@dataclass
class _Layer:
    module: nn.Linear
    w_index: int                    # index of the weight among the shared parameters
    b_index: int | None             # index of the bias, or None
    calls: int = 0                  # forwards with grad since the last backward
    x: torch.Tensor | None = None   # [N, in], the last forward's input
    ok: bool = True                 # the last forward was usable (no autocast, dtype)
    tied: bool = False              # the graph reaches its parameters more than once
    D: torch.Tensor | None = None   # [T, N, out] output gradients of this step
    S: torch.Tensor | None = None   # [T, out] per-task bias gradients (D summed over rows)
    filled: list[bool] = field(default_factory=list)
    active: bool = False


def _leaf_uses(roots) -> dict[int, int]:
    """id(leaf) -> number of graph edges into its AccumulateGrad node, over the graphs of
    ``roots``."""
    stack = []
    for r in roots:
        if isinstance(r, GradientEdge):
            stack.append(r.node)
        elif r.grad_fn is not None:
            stack.append(r.grad_fn)
    uses: dict[int, int] = {}
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
                uses[id(var)] = uses.get(id(var), 0) + 1
            stack.append(f)
    return uses


class LinearEngine:
    """Forward/tensor hooks on the eligible Linear modules and the Gram/combine of the layers
    active on a step (see the module docstring)."""

    def __init__(self, modules: list[nn.Module], mode: str):
        """Hook every plain ``nn.Linear`` in ``modules`` (at construction, so that the first
        step's forward is seen); :meth:`bind` keeps those whose parameters are shared."""
        self.mode = mode
        self.layers: list[_Layer] = []
        self.capturing = False
        self.task = 0
        self.last_active = 0            # layers the last step used
        self._checked = False
        seen = set()
        for root in modules:
            for m in root.modules():
                if id(m) in seen or type(m) is not nn.Linear or "forward" in vars(m):
                    continue
                seen.add(id(m))
                self.layers.append(_Layer(m, -1, None))
        self._handles = {id(l): l.module.register_forward_hook(self._forward_hook(l))
                         for l in self.layers}

    def bind(self, shared: list[torch.Tensor]) -> None:
        """On the first step, once the shared parameters are known: keep the layers whose weight
        (and bias) are shared, at their indices."""
        index = {id(p): i for i, p in enumerate(shared)}
        keep = []
        for l in self.layers:
            m = l.module
            wi = index.get(id(m.weight))
            bi = None if m.bias is None else index.get(id(m.bias))
            if wi is None or (m.bias is not None and bi is None):
                self._handles.pop(id(l)).remove()
                continue
            l.w_index, l.b_index = wi, bi
            keep.append(l)
        self.layers = keep

    def remove(self) -> None:
        for h in self._handles.values():
            h.remove()
        self._handles = {}

    # --- hooks ---------------------------------------------------------------------------------
    def _forward_hook(self, layer: _Layer):
        def hook(module: nn.Linear, inputs, output) -> None:
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                return
            layer.calls += 1
            x = inputs[0] if inputs else None
            layer.ok = (isinstance(x, torch.Tensor) and x.dtype == module.weight.dtype and
                        not torch.is_autocast_enabled(x.device.type))
            if not layer.ok:
                layer.x = None
                return
            layer.x = x.detach().reshape(-1, module.in_features)
            output.register_hook(self._grad_hook(layer))
        return hook

    def _grad_hook(self, layer: _Layer):
        def hook(g: torch.Tensor) -> None:
            if self.capturing and layer.active:
                layer.D[self.task].copy_(g.reshape(layer.D.shape[1:]))
                layer.filled[self.task] = True
        return hook

    # --- a step --------------------------------------------------------------------------------
    @staticmethod
    def _cheaper(T: int, N: int, n_in: int, n_out: int) -> bool:
        act = N * N * n_in + 2 * T * N * N * n_out + T * T * N * n_out // 2 + \
            2 * N * n_in * n_out + 8 * N ** 3
        direct = (T * T // 2 + 4 * T) * n_in * n_out
        return act < direct

    def begin(self, roots, T: int) -> int:
        """Before the per-task passes: decide which layers are active this step and ready their
        buffers; returns how many are."""
        if not self._checked:                   # first step: tied parameters are never used
            uses = _leaf_uses(roots)
            for l in self.layers:
                ps = [l.module.weight] + ([l.module.bias] if l.module.bias is not None else [])
                l.tied = any(uses.get(id(p), 0) != 1 for p in ps)
            self._checked = True
        n = 0
        for l in self.layers:
            x = l.x
            l.active = (self.mode != "off" and not l.tied and l.calls == 1 and l.ok and
                        x is not None)
            if l.active and self.mode == "auto":
                l.active = self._cheaper(T, x.shape[0], l.module.in_features,
                                         l.module.out_features)
            if l.active:
                shape = (T, x.shape[0], l.module.out_features)
                if l.D is None or l.D.shape != shape or l.D.device != x.device:
                    l.D = torch.empty(shape, dtype=x.dtype, device=x.device)
                l.filled = [False] * T
                n += 1
        self.capturing = n > 0
        self.last_active = n
        return n

    def after_task(self, t: int) -> None:
        """After task ``t``'s backward: zero ``D[t]`` of active layers it did not reach."""
        for l in self.layers:
            if l.active and not l.filled[t]:
                l.D[t].zero_()

    def end(self) -> None:
        """After the step's per-task passes: stop capturing; the next forward counts anew."""
        self.capturing = False
        for l in self.layers:
            l.calls = 0

    def release(self) -> None:
        """After the combine: drop the step's inputs."""
        for l in self.layers:
            l.x = l.S = None
            l.active = False

    def active(self) -> list[_Layer]:
        return [l for l in self.layers if l.active]

    # --- Gram and combine ----------------------------------------------------------------------
    @staticmethod
    def param_grams(l: _Layer) -> list[tuple[int, torch.Tensor]]:
        """``(shared index, [T, T] Gram)`` of the layer's weight and bias."""
        out = [(l.w_index, linear_gram(l.x, l.D))]
        if l.b_index is not None:
            l.S = l.D.sum(1)
            out.append((l.b_index, _rows_gram(l.S)))
        return out

    @staticmethod
    def combine_into(l: _Layer, w_weight: torch.Tensor, w_bias: torch.Tensor | None,
                     g_weight: torch.Tensor, g_bias: torch.Tensor | None) -> None:
        """The layer's combined weight (and bias) gradient into the given flat-buffer views."""
        linear_combine(l.x, l.D, w_weight, out=g_weight)
        if g_bias is not None:
            S = l.S if l.S is not None else l.D.sum(1)
            torch.mv(S.T, w_bias.to(S.dtype), out=g_bias)
