"""Turning chosen layers of any encoder task-specific (Recon: Shi et al., "Recon: Reducing
Conflicting Gradients from the Root for Multi-Task Learning", ICLR 2023, Sec. 4).

:class:`BranchedEncoder` wraps a copy of an ``nn.Module`` encoder. Each branched *layer* (a
module owning parameters directly, weight and bias together) gets one copy of its own tensors
per task (parameters, and buffers such as BatchNorm's running statistics); every other parameter
stays shared. ``forward(x)`` returns a list of ``T`` outputs, one per task stream.

How it runs (``mode``):

- ``"fx"``: the encoder is traced once with :func:`torch.fx.symbolic_trace` and its graph is
  interpreted node by node. A node that depends on no branched layer runs once, for every task;
  the first node that touches a branched layer (its module call, or a ``get_attr`` of one of its
  tensors) and every node downstream of it run once per task stream, with task ``t``'s tensors
  substituted through :func:`torch.func.functional_call`. So layers before the first branched
  layer run once, those after it ``T`` times: the compute a hand-written branched network does.
- ``"replay"``: the whole encoder runs ``T`` times, each time with task ``t``'s tensors
  substituted (:func:`torch.func.functional_call`). Works for any module, including ones
  :mod:`torch.fx` cannot trace (data-dependent control flow); costs ``T`` full forwards.
- ``"auto"`` (default): ``"fx"`` when the encoder traces, else ``"replay"``; the mode taken is in
  :attr:`BranchedEncoder.mode` and in :func:`branch_report`.

Shared layers downstream of a branch see each task's stream separately: a shared BatchNorm
there normalises each stream with that stream's batch statistics and updates its running
statistics once per stream (``T`` times per forward), as in a network built with those branches.

Initialisation (``init``): ``"copy"`` gives every task a copy of the layer's current tensors (the
forward then equals the unbranched one; what pretrained backbones need); ``"reinit"`` gives
every task an independently re-initialised copy (the layer's ``reset_parameters()``; Recon
retrains the branched network from scratch).
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.func import functional_call

from ..config.extras import RECON_INITS

__all__ = ["BranchedEncoder", "BranchedMTLModel", "branch_model", "branch_report",
           "layer_names", "shared_module", "INITS", "MODES"]

INITS = RECON_INITS
MODES = ("auto", "fx", "replay")


def layer_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s layers: sub-modules owning parameters directly (``""`` for the
    root), in ``named_modules`` order."""
    return [name for name, m in module.named_modules()
            if any(True for _ in m.parameters(recurse=False))]


def _own_tensors(m: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {n: p for n, p in m.named_parameters(recurse=False)}
    buffers = {n: b for n, b in m.named_buffers(recurse=False) if b is not None}
    return params, buffers


class _LayerCopy(nn.Module):
    """One task's copy of one layer's own tensors (same attribute names as in the layer)."""

    def __init__(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]):
        super().__init__()
        for n, p in params.items():
            self.register_parameter(n, nn.Parameter(p.detach().clone(),
                                                    requires_grad=p.requires_grad))
        for n, b in buffers.items():
            self.register_buffer(n, b.detach().clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.named_parameters(recurse=False))
        out.update(self.named_buffers(recurse=False))
        return out


class _PerTask:
    """A value computed once per task stream (a leaf for ``torch.fx.node.map_aggregate``)."""

    __slots__ = ("values",)

    def __init__(self, values: list[Any]):
        self.values = values


def _pick(x: Any, t: int) -> Any:
    return torch.fx.node.map_aggregate(x, lambda v: v.values[t] if isinstance(v, _PerTask)
                                       else v)


class BranchedEncoder(nn.Module):
    """``encoder`` (deep-copied; the argument is left untouched) with ``layers`` task-specific.

    Args:
        encoder: any ``nn.Module``.
        layers: names of its layers to branch (modules owning parameters directly, as in
            :func:`layer_names`).
        num_tasks: ``T``, the number of task streams (>= 1).
        init: ``"reinit"`` or ``"copy"`` (module docstring).
        mode: ``"auto"``, ``"fx"`` or ``"replay"`` (module docstring).

    Attributes:
        base: the encoder copy holding the shared parameters (the branched layers' own tensors
            are non-persistent placeholders there, replaced on every call).
        branches: ``branches[key][t]`` holds task ``t``'s tensors of a branched layer
            (``key``: the layer name with ``.`` written as ``-``).
        mode: the mode taken (``"fx"`` or ``"replay"``); ``trace_error``: why fx was not taken.
    """

    def __init__(self, encoder: nn.Module, layers: Sequence[str], num_tasks: int,
                 init: str = "reinit", mode: str = "auto"):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"BranchedEncoder: encoder must be an nn.Module, got "
                            f"{type(encoder).__name__}")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"BranchedEncoder: num_tasks must be an int >= 1, got {num_tasks!r}")
        if init not in INITS:
            raise ValueError(f"BranchedEncoder: init must be one of {INITS}, got {init!r}")
        if mode not in MODES:
            raise ValueError(f"BranchedEncoder: mode must be one of {MODES}, got {mode!r}")
        layers = list(layers)
        valid = layer_names(encoder)
        for name in layers:
            if name not in valid:
                raise ValueError(f"BranchedEncoder: layers: {name!r} is not a layer of the "
                                 f"encoder (a module owning parameters); layers: {valid[:8]}"
                                 f"{' ...' if len(valid) > 8 else ''}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"BranchedEncoder: layers has duplicates: {layers}")
        self.num_tasks = num_tasks
        self.layers = layers
        self.init = init
        base = copy.deepcopy(encoder)
        self.base = base
        self.branches = nn.ModuleDict()
        for name in layers:
            mod = base.get_submodule(name)
            params, buffers = _own_tensors(mod)
            copies = []
            for _ in range(num_tasks):
                if init == "copy":
                    copies.append(_LayerCopy(params, buffers))
                    continue
                fresh = copy.deepcopy(mod)
                if not hasattr(fresh, "reset_parameters"):
                    raise ValueError(f"BranchedEncoder: init='reinit' needs "
                                     f"reset_parameters() on layer {name!r} "
                                     f"({type(mod).__name__}); use init='copy'")
                fresh.reset_parameters()
                copies.append(_LayerCopy(*_own_tensors(fresh)))
            self.branches[self._key(name)] = nn.ModuleList(copies)
            # the base keeps non-persistent placeholders (module code may read their shapes)
            for n, p in params.items():
                del mod._parameters[n]
                mod.register_buffer(n, p.detach(), persistent=False)
            for n, b in buffers.items():
                mod.register_buffer(n, b.detach(), persistent=False)
        # module prefixes whose calls touch a branched layer, and the branched tensors' names
        self._touching = set()
        for name in layers:
            parts = name.split(".") if name else []
            for i in range(len(parts) + 1):
                self._touching.add(".".join(parts[:i]))
        self._tensor_names = {(f"{name}.{n}" if name else n): (name, n)
                              for name in layers
                              for n in self.branches[self._key(name)][0].tensors()}
        self.trace_error: str | None = None
        graph = None
        if mode in ("auto", "fx"):
            try:
                graph = torch.fx.symbolic_trace(base).graph
            except Exception as e:  # noqa: BLE001  (any tracing failure)
                self.trace_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if mode == "fx":
                    raise ValueError(f"BranchedEncoder: mode='fx': torch.fx cannot trace the "
                                     f"encoder ({self.trace_error}); use mode='replay'") from e
        object.__setattr__(self, "_graph", graph)   # not a submodule: no duplicate parameters
        self.mode = "fx" if graph is not None else "replay"

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "-") if name else "(root)"

    # --- parameters --------------------------------------------------------------------------
    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters every task shares (those of :attr:`base`)."""
        return list(self.base.parameters())

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        """Task ``t``'s copies of the branched layers' parameters."""
        return [p for name in self.layers for p in self.branches[self._key(name)][t].parameters()]

    def _subst(self, prefix: str, t: int) -> dict[str, torch.Tensor]:
        """Task ``t``'s tensors of the branched layers in module ``prefix``, named relative to
        it (for ``functional_call``)."""
        out = {}
        for name in self.layers:
            if prefix and not (name == prefix or name.startswith(prefix + ".")):
                continue
            rel = name[len(prefix) + 1:] if prefix and name != prefix else ("" if prefix
                                                                            else name)
            for n, v in self.branches[self._key(name)][t].tensors().items():
                out[f"{rel}.{n}" if rel else n] = v
        return out

    # --- forward -----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The ``T`` task streams' outputs (a list)."""
        if self._graph is None:
            return [functional_call(self.base, self._subst("", t), args, kwargs)
                    for t in range(self.num_tasks)]
        return self._run_graph(args, kwargs)

    def _exec(self, node: torch.fx.Node, a: tuple, kw: dict, t: int | None) -> Any:
        if node.op == "call_function":
            return node.target(*a, **kw)
        if node.op == "call_method":
            obj, *rest = a
            return getattr(obj, node.target)(*rest, **kw)
        if node.op == "call_module":
            mod = self.base.get_submodule(node.target)
            if t is not None and node.target in self._touching:
                return functional_call(mod, self._subst(node.target, t), tuple(a), kw)
            return mod(*a, **kw)
        if node.op == "get_attr":
            if t is not None and node.target in self._tensor_names:
                layer, n = self._tensor_names[node.target]
                return getattr(self.branches[self._key(layer)][t], n)
            return operator.attrgetter(node.target)(self.base)
        raise RuntimeError(f"BranchedEncoder: unexpected fx node {node.op}")  # pragma: no cover

    def _run_graph(self, args: tuple, kwargs: dict) -> list[Any]:
        T = self.num_tasks
        env: dict[torch.fx.Node, Any] = {}
        pos = iter(args)
        for node in self._graph.nodes:
            if node.op == "placeholder":
                name = node.target.lstrip("*")
                if node.target.startswith("*"):
                    env[node] = tuple(pos)
                elif name in kwargs:
                    env[node] = kwargs[name]
                else:
                    try:
                        env[node] = next(pos)
                    except StopIteration:
                        if not node.args:
                            raise TypeError(f"BranchedEncoder.forward: missing argument "
                                            f"{name!r}") from None
                        env[node] = node.args[0]
                continue
            a = torch.fx.node.map_arg(node.args, lambda n: env[n])
            kw = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.op == "output":
                return [_pick(a[0], t) for t in range(T)]
            per_task = any(isinstance(v, _PerTask) for v in _leaves((a, kw))) or (
                (node.op == "call_module" and node.target in self._touching) or
                (node.op == "get_attr" and node.target in self._tensor_names))
            if per_task:
                env[node] = _PerTask([self._exec(node, _pick(a, t), _pick(kw, t), t)
                                      for t in range(T)])
            else:
                env[node] = self._exec(node, a, kw, None)
        raise RuntimeError("BranchedEncoder: the traced graph has no output")  # pragma: no cover


def _leaves(x: Any) -> list[Any]:
    out: list[Any] = []
    torch.fx.node.map_aggregate(x, lambda v: out.append(v) or v)
    return out


class BranchedMTLModel(nn.Module):
    """A :class:`BranchedEncoder` and one head per task: ``forward(x)`` returns
    ``{task: head_t(stream_t)}``, stream ``t`` being the encoder's output for task ``t`` (the
    heads in the order of ``heads``). With ``resize_to_input`` (dense tasks) a head's map is
    resized bilinearly to the input's height and width, as the trainer's dense model does."""

    def __init__(self, encoder: BranchedEncoder, heads: nn.ModuleDict,
                 resize_to_input: bool = False):
        super().__init__()
        if len(heads) != encoder.num_tasks:
            raise ValueError(f"BranchedMTLModel: {len(heads)} heads for an encoder of "
                             f"{encoder.num_tasks} task streams")
        self.encoder = encoder
        self.heads = heads
        self.resize_to_input = resize_to_input

    def shared_parameters(self) -> list[nn.Parameter]:
        return self.encoder.shared_parameters()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hs = self.encoder(x)
        out = {}
        for (name, head), h in zip(self.heads.items(), hs):
            y = head(h)
            if self.resize_to_input and y.dim() == 4 and y.shape[-2:] != x.shape[-2:]:
                y = torch.nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear",
                                                    align_corners=False)
            out[name] = y
        return out


def shared_module(net: nn.Module) -> nn.Module:
    """The module holding the shared parameters: the encoder, or a branched encoder's base."""
    return net.encoder.base if isinstance(net, BranchedMTLModel) else net.encoder


def branch_model(model: nn.Module, layers: Sequence[str], init: str = "reinit",
                 mode: str = "auto") -> BranchedMTLModel:
    """A model with ``encoder`` and ``heads`` (the trainer's ``MTLModel`` or ``DenseMTLModel``,
    whose head outputs are resized to the input) with the encoder's
    ``layers`` task-specific. Layer names are relative to the encoder (a leading ``encoder.`` is
    accepted). The heads are shared with ``model``; the encoder is copied."""
    for attr in ("encoder", "heads"):
        if not hasattr(model, attr):
            raise TypeError(f"branch_model: model must have .encoder and .heads, got "
                            f"{type(model).__name__}")
    names = [n[len("encoder."):] if n.startswith("encoder.") else n for n in layers]
    enc = BranchedEncoder(model.encoder, names, len(model.heads), init=init, mode=mode)
    return BranchedMTLModel(enc, model.heads,
                            resize_to_input=type(model).__name__ == "DenseMTLModel")


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    was = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            module(x)
    finally:
        module.train(was)
    return int(fc.get_total_flops())


def branch_report(encoder: nn.Module, branched: BranchedEncoder,
                  example: torch.Tensor) -> dict[str, Any]:
    """Parameter and FLOP growth of ``branched`` over the unbranched ``encoder``.

    FLOPs are those :class:`torch.utils.flop_counter.FlopCounterMode` counts (matmuls and
    convolutions) for one forward of ``example`` in eval mode, as executed: in ``"fx"`` mode the
    layers before the first branched layer run once; in ``"replay"`` mode everything runs
    ``T`` times.
    """
    p0 = sum(p.numel() for p in encoder.parameters())
    p1 = sum(p.numel() for p in branched.parameters())
    per_layer = {name: sum(p.numel() for p in branched.branches[branched._key(name)][0]
                           .parameters()) for name in branched.layers}
    f0, f1 = _flops(encoder, example), _flops(branched, example)
    return {"layers": list(branched.layers), "tasks": branched.num_tasks,
            "init": branched.init, "mode": branched.mode, "trace_error": branched.trace_error,
            "params_unbranched": p0, "params_branched": p1,
            "params_growth": (p1 - p0) / p0 if p0 else 0.0, "params_per_layer": per_layer,
            "flops_unbranched": f0, "flops_branched": f1,
            "flops_growth": (f1 - f0) / f0 if f0 else 0.0,
            "example_shape": list(example.shape)}
