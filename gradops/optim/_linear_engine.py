"""Per-task gradients of ``nn.Linear`` and ``nn.Conv2d`` layers in factored form, and their Gram
and combination (:mod:`gradops.ops.linear_gram`), for :class:`~gradops.optim.mtl.MTLOptimizer`.

Task ``t``'s gradient of a Linear layer's weight is ``D_t^T X``: the layer's input ``X``
(``[N, in]``, kept by a forward hook) times task ``t``'s gradient with respect to the layer's
output ``D_t`` (``[N, out]``, copied by a tensor hook during task ``t``'s backward into a buffer
``D`` of ``[T, N, out]``, allocated once per batch size); the bias gradient is ``D_t^T 1``. For a
layer the engine takes on a step, the per-task backward passes compute ``D_t`` only (the
layer's output is a backward input, through its gradient edge, in place of its weight and
bias): the ``T`` weight-gradient products ``D_t^T X`` (``T N in out`` multiply-adds, about half
of each backward pass of an MLP) are never run, and the layer's columns of ``J`` are neither
written nor read this step. The Gram comes from ``<L^T D_s, L^T D_t>`` (``X X^T = L L^T``), the
combined gradient from ``(sum_t w_t D_t)^T X``, written into the layer's ``.grad`` views: the same
values as through ``J``, up to float32 rounding. Every other shared parameter goes through
``J`` as before.

A convolution is a Linear layer applied to its input's patches: with ``X`` the unfolded input
(``F.unfold``: one row per batch element and output pixel, ``C_in kh kw`` columns in the order of
``weight.view(C_out, -1)``) and ``D_t`` the output gradient with one row per output pixel
(``[N H_out W_out, C_out]``), task ``t``'s weight gradient is again ``D_t^T X`` and its bias
gradient ``D_t^T 1``, so the same Gram and combine apply with ``N`` = batch x output pixels. That
is cheaper than the weight gradients only where the feature map is small against the kernel's
``C_in kh kw`` (late, narrow-map layers at small batch), which the cost model below decides per
layer; early layers with wide maps stay in ``J``.

Which modules are searched: the factorable modules (:func:`factorable`: plain ``nn.Linear``, and
plain ``nn.Conv2d`` with ``groups=1`` and symmetric zero padding) inside the modules passed to
the optimizer (``shared=`` as modules, or ``module=``). When none are passed (``shared=`` a list of
parameters, or ``"auto"``), the engine finds them itself: from construction until the end of
the first backward that follows a forward of the model, a global module forward hook
(:func:`torch.nn.modules.module.register_module_forward_hook`) sees every module's forward and
adopts each factorable module that owns parameters of the optimizer; the shared ones are kept
when the shared parameters are known. So the first step's forward must run after the optimizer
is constructed (the usual loop); a model run earlier is found on the next step.
:attr:`MTLOptimizer.factored_layers` tells which layers the last step took.

A layer is used on a step when all of these hold (Python-level checks, no host sync):

- it is factorable (a plain ``nn.Linear`` or ``nn.Conv2d``) and its weight (and bias, if any)
  are shared parameters, and on the first step the autograd graph reaches the weight and bias
  only once (not tied to another use);
- its forward ran exactly once with grad since the last :meth:`MTLOptimizer.backward`, outside
  ``torch.autocast``, on an input of the weight's dtype;
- the optimizer runs in one process (with a process group, ``sync="global"`` averages ``J``
  over the ranks, which the local activations cannot reproduce; ``sync="local"`` could use the
  engine but is not tested with it) and without sparse-training masks (which mask ``J``);
- ``mode="on"``, or ``mode="auto"`` on CPU tensors (the engine has not been measured on a GPU
  yet; ``"on"`` runs it there) and the cost model says it is cheaper, in multiply-adds:
  ``N^2 in + 8 N^3 + T N^2 out + T^2 N out / 2 + 2 N in out`` (``K``, its eigendecomposition,
  ``L^T D_t``, their Gram, the combine's product, which counts double: small torch products)
  against ``T N in out + T^2 in out / 2 + 4 T in out`` (the per-task weight gradients, the Gram
  over ``J``, and writing and reading ``J``: memory-bound, 4 per element). For ``N = 64`` rows
  and ``in = out = 1024`` the engine is cheaper from ``T = 3`` on; for ``N`` in the thousands
  (sequence models) it is not. For a convolution ``N`` is batch x output pixels, ``in`` is
  ``C_in kh kw`` and ``out`` is ``C_out``: in the benchmark's CNN (batch 32 on 32 x 32 inputs)
  only the last convolution (2 x 2 output pixels, 128 rows, ``1152 x 256``) qualifies, from
  ``T = 8`` on.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.nn import functional as F

from ..ops.linear_gram import _rows_gram, linear_combine, linear_gram
from ._graph import leaf_uses

MODES = ("auto", "on", "off")


def _conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    """The symmetric zero padding of a Conv2d as a pair (``padding="same"`` resolved), or None
    when it pads unevenly (``"same"`` with an even ``dilation * (kernel - 1)``)."""
    if not isinstance(m.padding, str):
        return (int(m.padding[0]), int(m.padding[1]))
    if m.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
    if any(t % 2 for t in total):
        return None
    return (total[0] // 2, total[1] // 2)


def factorable(m: nn.Module) -> bool:
    """Whether the engine can keep ``m``'s per-task gradients in factored form: a plain
    ``nn.Linear``, or a plain ``nn.Conv2d`` with ``groups=1``, zero padding (symmetric) and
    its own ``forward`` (a convolution is a Linear layer applied to the unfolded input
    patches)."""
    if "forward" in vars(m):
        return False
    if type(m) is nn.Linear:
        return True
    return (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and
            _conv_padding(m) is not None)


def describe(m: nn.Module) -> str:
    """A layer in a few words, e.g. ``Linear(24, 24)`` or ``Conv2d(3, 32, 3x3, stride 2)``."""
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features}, {m.out_features})"
    k, st = m.kernel_size, m.stride
    extra = "" if tuple(st) == (1, 1) else f", stride {st[0]}" if st[0] == st[1] else \
        f", stride {tuple(st)}"
    return f"Conv2d({m.in_channels}, {m.out_channels}, {k[0]}x{k[1]}{extra})"


@dataclass
class _Layer:
    module: nn.Module               # nn.Linear or nn.Conv2d (:func:`factorable`)
    name: str                       # its name in the module passed, "" when discovered
    w_index: int                    # index of the weight among the shared parameters
    b_index: int | None             # index of the bias, or None
    n_in: int = 0                   # the weight's columns: in_features, or C_in * kh * kw
    n_out: int = 0                  # its rows: out_features, or C_out
    calls: int = 0                  # forwards with grad since the last backward
    x: torch.Tensor | None = None   # the last forward's input: [N, in] rows (Linear), or the
    #                                 convolution's input
    X: torch.Tensor | None = None   # a convolution's input patches as rows, once unfolded
    rows: int = 0                   # N (for a convolution: batch x output pixels)
    ok: bool = True                 # the last forward was usable (no autocast, dtype)
    tied: bool = False              # the graph reaches its parameters more than once
    checked: bool = False           # ``tied`` was decided (on the layer's first step)
    edge: object = None             # the gradient edge of the last forward's output
    D: torch.Tensor | None = None   # [T, N, out] output gradients of this step
    S: torch.Tensor | None = None   # [T, out] per-task bias gradients (D summed over rows)
    filled: list[bool] = field(default_factory=list)
    active: bool = False


class LinearEngine:
    """Forward/tensor hooks on the eligible Linear modules and the Gram/combine of the layers
    active on a step (see the module docstring)."""

    def __init__(self, modules: list[nn.Module], mode: str,
                 params: list[torch.Tensor] | None = None):
        """Hook every plain ``nn.Linear`` in ``modules`` (at construction, so that the first
        step's forward is seen); :meth:`bind` keeps those whose parameters are shared. With no
        ``modules``, discover them (module docstring) among the owners of ``params`` (the
        optimizer's parameters)."""
        self.mode = mode
        self.layers: list[_Layer] = []
        self.capturing = False
        self.task = 0
        self.last_active = 0            # layers the last step used
        self.last_taken: list[_Layer] = []   # layers the last step with per-task passes used
        self.T: int | None = None       # the number of tasks, from the first step
        self._index: dict[int, int] | None = None   # id(shared parameter) -> index, once bound
        self._handles: dict[int, object] = {}
        seen = set()
        for root in modules:
            for name, m in root.named_modules():
                if id(m) in seen or not factorable(m):
                    continue
                seen.add(id(m))
                self._adopt(m, name)
        self._params = {id(p) for p in params or []}
        self._discovery = None          # the global forward hook, while discovering
        self._saw_model = False         # discovery saw a forward of a module owning params
        if not modules:
            engine_ref = weakref.ref(self)

            def discover(module: nn.Module, inputs, output) -> None:
                engine = engine_ref()
                if engine is not None:
                    engine._discover(module, inputs, output)
            self._discovery = nn.modules.module.register_module_forward_hook(discover)

    def _adopt(self, m: nn.Module, name: str) -> _Layer | None:
        """Take ``m`` as a layer (with its forward hook); None when it is bound and not shared."""
        if isinstance(m, nn.Linear):
            n_in, n_out = m.in_features, m.out_features
        else:
            n_in, n_out = m.weight[0].numel(), m.out_channels
        layer = _Layer(m, name, -1, None, n_in=n_in, n_out=n_out)
        if self._index is not None and not self._place(layer):
            return None
        self.layers.append(layer)
        self._handles[id(layer)] = m.register_forward_hook(self._forward_hook(layer))
        return layer

    def _discover(self, module: nn.Module, inputs, output) -> None:
        """The global forward hook's work: adopt a factorable layer (a plain Linear or Conv2d)
        owning optimizer parameters, and treat this forward as its first (its own hook was not
        registered yet)."""
        own = [id(p) for p in module.parameters(recurse=False)]
        if not any(i in self._params for i in own):
            return
        self._saw_model = True
        if not factorable(module) or not all(i in self._params for i in own) or \
                any(l.module is module for l in self.layers):
            return
        layer = self._adopt(module, "")
        if layer is not None:
            self._forward_hook(layer)(module, inputs, output)

    def _place(self, l: _Layer) -> bool:
        """Set the layer's indices among the shared parameters; False if not all are shared."""
        m = l.module
        wi = self._index.get(id(m.weight))
        bi = None if m.bias is None else self._index.get(id(m.bias))
        if wi is None or (m.bias is not None and bi is None):
            return False
        l.w_index, l.b_index = wi, bi
        return True

    def bind(self, shared: list[torch.Tensor]) -> None:
        """On the first step, once the shared parameters are known: keep the layers whose weight
        (and bias) are shared, at their indices."""
        self._index = {id(p): i for i, p in enumerate(shared)}
        keep = []
        for l in self.layers:
            if self._place(l):
                keep.append(l)
            else:
                self._handles.pop(id(l)).remove()
        self.layers = keep
        self._end_discovery()

    def _end_discovery(self) -> None:
        """Stop discovering once a backward followed a forward of the model."""
        if self._discovery is not None and self._saw_model and self._index is not None:
            self._discovery.remove()
            self._discovery = None

    @property
    def discovering(self) -> bool:
        return self._discovery is not None

    def remove(self) -> None:
        """Remove the forward hooks (also done when the engine is garbage-collected: the hooks
        hold only weak references to it, so a dropped optimizer leaves nothing on the model)."""
        for h in self._handles.values():
            h.remove()
        self._handles = {}
        if self._discovery is not None:
            self._discovery.remove()
            self._discovery = None

    def __del__(self) -> None:
        self.remove()

    # --- hooks ---------------------------------------------------------------------------------
    def _forward_hook(self, layer_: _Layer):
        engine_ref, layer_ref = weakref.ref(self), weakref.ref(layer_)

        def hook(module: nn.Module, inputs, output) -> None:
            engine, layer = engine_ref(), layer_ref()
            if engine is None or layer is None or not (isinstance(output, torch.Tensor) and
                                                       output.requires_grad):
                return
            layer.calls += 1
            x = inputs[0] if inputs else None
            layer.rows = output.numel() // max(1, layer.n_out)
            layer.ok = (isinstance(x, torch.Tensor) and x.dtype == module.weight.dtype and
                        not torch.is_autocast_enabled(x.device.type) and
                        engine._wanted(layer, x.device))
            if not layer.ok:
                layer.x = layer.edge = None
                return
            layer.x = x.detach().reshape(-1, layer.n_in) if isinstance(module, nn.Linear) \
                else x.detach()                 # unfolded on first use (:meth:`inputs`)
            layer.edge = get_gradient_edge(output)
            output.register_hook(engine._grad_hook(layer))
        return hook

    def _grad_hook(self, layer_: _Layer):
        engine_ref, layer_ref = weakref.ref(self), weakref.ref(layer_)

        def hook(g: torch.Tensor) -> None:
            engine, layer = engine_ref(), layer_ref()
            if engine is not None and layer is not None and engine.capturing and layer.active:
                d = layer.D[engine.task]
                if isinstance(layer.module, nn.Linear):
                    d.copy_(g.reshape(d.shape))
                else:                  # [N, C_out, H, W] (or [C_out, H, W]) -> [N * H * W, C_out]
                    g4 = g if g.dim() == 4 else g.unsqueeze(0)
                    n = g4.shape[0]
                    d.view(n, -1, layer.n_out).copy_(g4.reshape(n, layer.n_out, -1).transpose(1, 2))
                layer.filled[engine.task] = True
        return hook

    # --- a step --------------------------------------------------------------------------------
    @staticmethod
    def _cheaper(T: int, N: int, n_in: int, n_out: int) -> bool:
        """The cost model (module docstring): is the engine cheaper than ``J`` for this layer?"""
        engine = N * N * n_in + 8 * N ** 3 + T * N * N * n_out + T * T * N * n_out // 2 + \
            2 * N * n_in * n_out
        direct = T * N * n_in * n_out + T * T * n_in * n_out // 2 + 4 * T * n_in * n_out
        return engine < direct

    def _wanted(self, layer: _Layer, device: torch.device) -> bool:
        """Whether ``begin`` could take this layer on the next step, as far as the forward
        tells (``"auto"``: the device and the cost model at the last step's T, for the layer's
        last ``rows``), so that a layer it will not take keeps no input and adds no tensor
        hook."""
        if self.mode != "auto":
            return True
        if device.type != "cpu":               # (CPU only until measured on a GPU)
            return False
        return self.T is None or self._cheaper(self.T, layer.rows, layer.n_in, layer.n_out)

    def begin(self, roots, T: int) -> int:
        """Before the per-task passes: decide which layers are active this step and ready their
        buffers; returns how many are."""
        self.T = T
        if any(not l.checked for l in self.layers):   # a layer's first step: tied ones never
            uses = leaf_uses(roots)
            for l in self.layers:
                if not l.checked:
                    ps = [l.module.weight] + ([l.module.bias] if l.module.bias is not None
                                              else [])
                    l.tied = any(uses.get(id(p), 0) != 1 for p in ps)
                    l.checked = True
        n = 0
        for l in self.layers:
            x = l.x
            l.active = not l.tied and l.calls == 1 and l.ok and x is not None
            if l.active:
                l.active = self._wanted(l, x.device)
            if l.active:
                shape = (T, l.rows, l.n_out)
                if l.D is None or l.D.shape != shape or l.D.device != x.device:
                    l.D = torch.empty(shape, dtype=x.dtype, device=x.device)
                l.filled = [False] * T
                n += 1
        self.capturing = n > 0
        self.last_active = n
        self.last_taken = self.active()
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
        self._end_discovery()

    def covered(self) -> set[int]:
        """Indices (among the shared parameters) of the active layers' weights and biases."""
        out = set()
        for l in self.active():
            out.add(l.w_index)
            if l.b_index is not None:
                out.add(l.b_index)
        return out

    def edges(self) -> list:
        """The gradient edges of the active layers' outputs: backward inputs in place of their
        parameters, so that each pass computes ``D_t`` and not ``D_t^T X``."""
        return [l.edge for l in self.active()]

    def release(self) -> None:
        """After the combine: drop the step's inputs."""
        for l in self.layers:
            l.x = l.X = l.S = l.edge = None
            l.active = False

    def idle(self) -> None:
        """A step that needs no per-task gradients (one weighted backward): forget this step's
        forwards and take no layer."""
        self.end()
        self.release()
        self.last_active = 0

    def active(self) -> list[_Layer]:
        return [l for l in self.layers if l.active]

    # --- Gram and combine ----------------------------------------------------------------------
    @staticmethod
    def inputs(l: _Layer) -> torch.Tensor:
        """The layer's input rows ``X`` (``[N, n_in]``): a Linear layer's input, or a
        convolution's input patches (``F.unfold``, ``[batch x output pixels, C_in x kh x kw]``,
        the column order of ``weight.view(C_out, -1)``), unfolded once per step."""
        m = l.module
        if isinstance(m, nn.Linear):
            return l.x
        if l.X is None:
            x = l.x if l.x.dim() == 4 else l.x.unsqueeze(0)
            U = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=_conv_padding(m),
                         stride=m.stride)                      # [batch, n_in, pixels]
            l.X = U.transpose(1, 2).reshape(-1, l.n_in)
        return l.X

    @classmethod
    def param_grams(cls, l: _Layer) -> list[tuple[int, torch.Tensor]]:
        """``(shared index, [T, T] Gram)`` of the layer's weight and bias."""
        out = [(l.w_index, linear_gram(cls.inputs(l), l.D))]
        if l.b_index is not None:
            l.S = l.D.sum(1)
            out.append((l.b_index, _rows_gram(l.S)))
        return out

    @classmethod
    def combine_into(cls, l: _Layer, w_weight: torch.Tensor, w_bias: torch.Tensor | None,
                     g_weight: torch.Tensor, g_bias: torch.Tensor | None) -> None:
        """The layer's combined weight (and bias) gradient into the given flat-buffer views."""
        linear_combine(cls.inputs(l), l.D, w_weight, out=g_weight.view(l.n_out, l.n_in))
        if g_bias is not None:
            S = l.S if l.S is not None else l.D.sum(1)
            torch.mv(S.T, w_bias.to(S.dtype), out=g_bias)
