"""``MTLOptimizer``: any torch optimizer, driven by a multi-task gradient method.

The data path (docs/methods.md#mtloptimizer-data-path)::

    losses -> T backward passes, each copying task t's gradient of each shared parameter into its
    slice of row t of one flat [T, P] buffer J as soon as autograd produces it (a hook)
    -> Gram G = J J^T (one pass; per-layer Grams with per_layer/stats, same pass)
    -> weights from G on J's device (gradops.weighting; PCGrad's recurrence; GradVac's)
    -> combined gradient w^T J (one pass) written into one flat [P] buffer whose views are the
       shared parameters' .grad
    -> (clip, GradScaler, ...) -> inner optimizer step.

For ``nn.Linear`` layers among the shared parameters (``linear_gram=``,
:mod:`gradops.optim._linear_engine`), where it is cheaper (small batch), task ``t``'s gradient
of the layer stays in factored form ``D_t^T X``: the passes compute the output gradients ``D_t``
but not the weight gradients, and the Gram and the combination come from ``<L^T D_s, L^T D_t>``
(``X X^T = L L^T``) and ``(sum_t w_t D_t)^T X``: the same ``G`` and ``w^T J`` up to float32
rounding, without the layer's row of ``J``.

Task-specific parameters (reached by one task's loss, or not listed in ``shared``) accumulate the
ordinary sum of their tasks' gradients in their own ``.grad``, as with ``sum(losses).backward()``.

No host synchronisation in :meth:`MTLOptimizer.backward` (no ``.item()``, no data-dependent
Python branch): the solvers run fixed iteration budgets on device (on CUDA one Triton program per
solve for T <= 64, which stops on the device once converged; C++ on CPU), random orders and seeds
are drawn on device from the optimizer's own generator. Remaining host work per step: the Python
loop over the T backward passes, the gradient hooks (one Python call per shared parameter and
task) and the pointer swaps of ``.grad``; reading :meth:`stats` synchronises (once per epoch).
The first step also walks the autograd graph to find the shared parameters when
``shared="auto"``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from .. import metrics
from .._backend import _C
from ..ops.combine import combine
from ..ops.gram import gram, segment_gram
from ..segments import offsets_from_numels
from ._distributed import GradientSync, process_group_of
from ._graph import leaf_uses
from ._linear_engine import MODES as LINEAR_MODES, LinearEngine, describe as describe_layer
from ..weighting import LossMethod, Method, Options, StepContext
from ._methods import resolve_method
from ._stats import StepStats, mean_pairs
from ._wrapper import OptimizerWrapper
from .sparse_training import SparseTraining

__all__ = ["MTLOptimizer", "MTLStepInfo"]


@dataclass
class MTLStepInfo:
    """What :meth:`MTLOptimizer.backward` returns; every field is a device tensor (or None).

    Attributes:
        weights: the combination weights, ``[T]`` (``[L, T]`` for per-layer methods; None for
            GradDrop).
        gram: ``G = J J^T`` ``[T, T]`` of this step's per-task gradients (None when the method
            needed no per-task gradients this step: EW without stats, ``update_every`` steps).
        conflict_incidence: fraction of task pairs with negative cosine (0-dim), or None.
        layer_gram: per-layer Grams ``[L, T, T]`` (``stats=True`` or per-layer methods).
        layer_conflicts: per-layer count of conflicting pairs (Recon's S-score with S = 0,
            ``[L]``), with ``stats=True``.
        layer_gms: per-layer mean over pairs of the gradient magnitude similarity ``[L]``, with
            ``stats=True``.
        converged: whether the solver converged (0-dim bool), for iterative solvers.
    """

    weights: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    conflict_incidence: torch.Tensor | None = None
    layer_gram: torch.Tensor | None = None
    layer_conflicts: torch.Tensor | None = None
    layer_gms: torch.Tensor | None = None
    converged: torch.Tensor | None = None


def _as_params(shared: Any) -> list[torch.Tensor]:
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


def _modules_of(shared: Any) -> list[nn.Module]:
    """The modules in a ``shared`` argument (a module, or a list / tuple holding some)."""
    if isinstance(shared, nn.Module):
        return [shared]
    if isinstance(shared, (list, tuple)):
        return [m for m in shared if isinstance(m, nn.Module)]
    return []


def _reached_leaves(root: torch.Tensor | GradientEdge) -> set[int]:
    """ids of the leaf tensors whose AccumulateGrad nodes the graph of ``root`` reaches."""
    return set(leaf_uses([root]))


# per-element operations with one differentiable input that may sit between torch.stack and the
# losses handed to backward (GradScaler.scale, casts, a constant factor)
_ELEMENTWISE = frozenset({"MulBackward0", "DivBackward0", "ToCopyBackward0", "CloneBackward0",
                          "AliasBackward0"})


def _stack_node(losses: torch.Tensor):
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


class MTLOptimizer(OptimizerWrapper):
    """Wrap ``optimizer`` so that :meth:`backward` applies a multi-task gradient method.

    Usage::

        opt = gradops.optim.MTLOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4),
                                         method="pcgrad", shared=model.encoder)
        for batch in loader:
            losses = model.losses(batch)   # list or 1-D tensor of T task losses
            opt.zero_grad()
            info = opt.backward(losses)    # per-task grads -> method -> combined .grad
            opt.step()

    Args:
        optimizer: any :class:`torch.optim.Optimizer` over all the model's parameters.
        method: a registered method's name (``gradops.weighting.method_names()``: ``"ew"``,
            ``"pcgrad"``, ``"pcgrad-layer"``, ``"graddrop"``, ``"mgda"``, ``"cagrad"``,
            ``"imtlg"``, ``"nashmtl"``, ``"alignedmtl"``, ``"gradvac"``, the loss-level
            ``"uw"``, ``"dwa"``, ``"famo"``, ...), a method object (e.g.
            ``gradops.weighting.CAGrad(c=0.4)``), or a callable ``f(G [T, T]) -> w [T]`` (e.g.
            a TorchJD ``Weighting``).
        method_options: the named method's options, a dict (``{"c": 0.4}``) or its Options
            dataclass (``gradops.weighting.get_method("cagrad").Options``); checked here.
        shared: the parameters (or modules) shared by all tasks, or ``"auto"`` (default): on the
            first step, the parameters that more than one task's loss reaches.
        per_layer: deprecated: ``method="pcgrad", per_layer=True`` is ``method="pcgrad-layer"``.
        num_tasks: the number of tasks, needed at construction by loss-level methods with
            parameters (UW's log-variances, added to ``optimizer`` as a parameter group with its
            defaults); otherwise taken from the first :meth:`backward`.
        update_every: recompute the weights every N steps (Gram-weighted methods; the Nash-MTL
            paper's option); in between, one backward of ``sum_t w_t L_t`` with the last weights.
        sparse: masks for sparse training (``{param: bool mask}``, or a
            :class:`gradops.sparse.SparseMasks` with ``module=``): the inner optimizer is wrapped
            in :class:`SparseTraining` and per-task gradients are masked before the Gram. An inner
            :class:`SparseTraining` is used the same way.
        module: the model (or its encoder): where sparse masks' parameter names and the Linear
            engine's layers are looked for.
        stats: per step, per-layer Grams, conflict counts and GMS in ``info`` (same pass), and
            per-task gradients even for EW.
        generator: the source of random orders (PCGrad, GradVac) and GradDrop's seeds; default:
            a new generator seeded from torch's global RNG (saved in :meth:`state_dict`).
        grad_scaler: the :class:`torch.amp.GradScaler` whose scaled losses reach :meth:`backward`;
            weightings that are not scale-invariant (Nash-MTL, MGDA with loss normalisation) then
            see the unscaled Gram. Scale-invariant methods need not pass it.
        ddp_model: a :class:`~torch.nn.parallel.DistributedDataParallel` model: its reducer is
            switched off (``require_backward_grad_sync = False``) and this optimizer all-reduces
            the per-task buffer once per step instead of T times; implies its process group.
        process_group: a process group for a plain (not DDP-wrapped) model: gradients are
            averaged over its ranks (as DDP does) before the method.
        sync: ``"global"`` (default): all-reduce the per-task gradients, then run the method on
            the global batch's gradients (equal to single-process training on the global batch);
            ``"local"``: run the method per rank and average the combined gradients (cheaper
            traffic, a different method: documented, not equal to the global one).
        bucket_mb: all-reduce bucket size.
        linear_gram: ``"auto"`` (default), ``"on"`` or ``"off"``: for ``nn.Linear`` layers and
            ``nn.Conv2d`` layers (``groups=1``, symmetric zero padding) among the shared
            parameters (looked for in the modules passed as ``shared`` or
            ``module``; when neither holds a module, e.g. ``shared`` a list of parameters, found
            on the first step's forward among the modules owning the optimizer's parameters;
            :attr:`factored_layers` and ``repr`` say which layers were taken), keep the
            per-task gradients in factored form (the layer's input and per-task output
            gradients; the per-task weight gradients are never computed) and compute the Gram
            and the combined gradient from them (:func:`gradops.linear_gram`, far fewer
            operations at small batch) instead of through the layer's columns of ``J``;
            ``"auto"`` on CPU where its cost model says it is cheaper (see
            :mod:`gradops.optim._linear_engine`), ``"on"`` for every eligible layer on any
            device. Not used with a process group, with sparse masks (``"on"`` is refused
            there) or with GradDrop. Same results up to float32 rounding.
        **options: deprecated: the method's options as keywords (``c=0.4``); use
            ``method_options=`` or a method object. Each method's options are its Options
            dataclass (docs/methods.md), e.g. ``c`` (CAGrad), ``leak`` (GradDrop), ``max_norm``
            (Nash-MTL), ``normalization`` (MGDA), ``beta`` (GradVac), ``reduction``,
            ``libmtl_self_visit`` (PCGrad: task ``i`` also visits itself, LibMTL's convention;
            default ``j != i``, the paper's).

    Loss-level methods (``kind == "loss"``: UW, DWA, FAMO, ...) turn the losses given to
    :meth:`backward` into per-task terms, whose gradients are combined as EW's; a method that
    re-evaluates the losses after the step (FAMO) needs ``opt.step(closure)``, the closure
    returning the T losses of the same batch (torch's convention, as for ``LBFGS``; it runs
    under ``torch.no_grad()``); DWA needs :meth:`end_epoch` once per epoch.

    AMP: pass ``scaler.scale(losses)`` to :meth:`backward`; ``scaler.unscale_(opt)`` /
    ``scaler.step(opt)`` work as for a plain optimizer (an overflow makes the combined gradient
    non-finite and the step is skipped; method state is not updated from non-finite values).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, method: str | Method | Callable = "ew",
                 shared: Any = "auto", *, method_options: dict[str, Any] | Options | None = None,
                 num_tasks: int | None = None, per_layer: bool = False, update_every: int = 1,
                 sparse: Any = None, module: nn.Module | None = None, stats: bool = False,
                 generator: torch.Generator | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None,
                 ddp_model: nn.Module | None = None, process_group: Any = None,
                 sync: str = "global", bucket_mb: float = 25.0, linear_gram: str = "auto",
                 **options: Any):
        if isinstance(optimizer, MTLOptimizer):
            raise TypeError("MTLOptimizer: the inner optimizer is already an MTLOptimizer")
        if sparse is not None:
            if isinstance(optimizer, SparseTraining):
                raise ValueError("MTLOptimizer: pass sparse= or an inner SparseTraining, not both")
            optimizer = SparseTraining(optimizer, sparse, module)
        super().__init__(optimizer, "MTLOptimizer")
        self.method: Method = resolve_method(method, per_layer, method_options, options)
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"MTLOptimizer: update_every must be an int >= 1, got "
                             f"{update_every!r}")
        if update_every > 1 and (self.method.kind != "gram" or self.method.random):
            raise ValueError("MTLOptimizer: update_every > 1 needs a Gram-weighted method with "
                             f"weights [T] (mgda, cagrad, imtlg, nashmtl, alignedmtl, a callable),"
                             f" not {self.method.name!r}")
        if sync not in ("global", "local"):
            raise ValueError(f"MTLOptimizer: sync must be 'global' or 'local', got {sync!r}")
        if linear_gram not in LINEAR_MODES:
            raise ValueError(f"MTLOptimizer: linear_gram must be one of {LINEAR_MODES}, got "
                             f"{linear_gram!r}")
        self.update_every = update_every
        self.stats_enabled = bool(stats)
        self.grad_scaler = grad_scaler
        self.sync = sync
        self._shared_arg = shared
        self._own_generator = generator is None
        if generator is None:   # on the parameters' device, seeded from torch's global RNG
            params = self._params()
            generator = torch.Generator(device=params[0].device if params else "cpu")
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self._generator = generator
        self._ddp = ddp_model
        process_group = process_group_of(ddp_model, process_group)
        self.process_group = process_group
        self._reducer = None if process_group is None else \
            GradientSync(process_group, int(bucket_mb * 2**20))
        self._linear_mode = linear_gram
        self._linear_modules = _modules_of(shared) + ([module] if module is not None else [])
        self._engine: LinearEngine | None = None
        if (linear_gram != "off" and process_group is None and
                not isinstance(optimizer, SparseTraining) and self.method.kind != "elementwise"):
            # no modules given: the engine finds the layers on the first step's forward
            self._engine = LinearEngine(self._linear_modules, linear_gram,
                                        [p for p in self._params() if p.requires_grad])
        if linear_gram == "on":
            why = ("it runs in single-process training only (a process group averages "
                   "gradients over the ranks)" if process_group is not None else
                   "sparse masks mask J" if isinstance(optimizer, SparseTraining) else None)
            if why:
                raise ValueError(f"MTLOptimizer: linear_gram='on' cannot be used here: {why}")
        self._layout_ready = False
        self._step = 0
        self._weights: torch.Tensor | None = None           # last weights (update_every, state)
        self._stats = StepStats()
        self._wdtype = torch.float32          # of Grams and weights; set with the layout
        self._loss_sum: torch.Tensor | None = None           # loss methods: the epoch's losses
        self._loss_steps = 0
        self._setup_loss_method(num_tasks)

    def __repr__(self) -> str:
        return (f"MTLOptimizer(method={self.method!r}, linear_gram={self._linear_mode!r}, "
                f"factored_layers={self._describe_factored()}, {self.optimizer!r})")

    @property
    def factored_layers(self) -> tuple[nn.Module, ...]:
        """The ``nn.Linear`` / ``nn.Conv2d`` modules whose per-task gradients the last step that
        formed per-task gradients kept in factored form (the Linear engine, ``linear_gram=``);
        every other shared parameter went through ``J``. Empty before the first step and with
        ``linear_gram="off"``."""
        engine = self._engine
        return () if engine is None else tuple(l.module for l in engine.last_taken)

    def _describe_factored(self) -> str:
        engine = self._engine
        if engine is None:
            return "[]"
        if not self._layout_ready:
            return "(decided on the first step)"
        names = [f"{l.name or f'shared[{l.w_index}]'}: {describe_layer(l.module)}"
                 for l in engine.last_taken]
        return f"[{', '.join(names)}] of {len(engine.layers)} Linear/Conv2d layers"

    # --- layout: shared parameters, the flat buffers and their views --------------------------
    def _resolve_shared(self, roots: Sequence[torch.Tensor | GradientEdge]) -> list[torch.Tensor]:
        params = [p for p in self._params() if p.requires_grad]
        if isinstance(self._shared_arg, str):
            if self._shared_arg != "auto":
                raise ValueError(f"MTLOptimizer: shared must be parameters, modules or 'auto', "
                                 f"got {self._shared_arg!r}")
            hits: dict[int, int] = {}
            for r in roots:
                for i in _reached_leaves(r):
                    hits[i] = hits.get(i, 0) + 1
            need = 2 if len(roots) > 1 else 1
            shared = [p for p in params if hits.get(id(p), 0) >= need]
            if not shared:
                raise ValueError("MTLOptimizer: shared='auto' found no parameter reached by more "
                                 "than one task's loss; pass shared= explicitly")
            return shared
        wanted = {id(p) for p in _as_params(self._shared_arg)}
        known = {id(p) for p in params}
        missing = wanted - known
        if missing:
            raise ValueError(f"MTLOptimizer: {len(missing)} shared parameter(s) are not "
                             "(trainable) parameters of the inner optimizer")
        return [p for p in params if id(p) in wanted]          # the optimizer's order

    def _build_layout(self, roots, T: int) -> None:
        shared = self._resolve_shared(roots)
        dtypes = {p.dtype for p in shared}
        devices = {p.device for p in shared}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"MTLOptimizer: shared parameters must share one dtype and device, "
                             f"got {sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        dev, dt = shared[0].device, shared[0].dtype
        self._shared = shared
        self._shared_ids = {id(p) for p in shared}
        self._specific = [p for p in self._params() if p.requires_grad and id(p) not in
                          self._shared_ids]
        numels = [p.numel() for p in shared]
        self._offsets_cpu = offsets_from_numels(numels)
        self._offsets = self._offsets_cpu.to(dev)
        P = int(self._offsets_cpu[-1])
        self.T, self.P, self.L = T, P, len(shared)
        self._J: torch.Tensor | None = None          # allocated by _buffer on first use
        self._J_views: list[list[torch.Tensor]] = []
        bounds = self._bounds = self._offsets_cpu.tolist()
        # the combined gradient [P], whose views are the shared parameters' .grad; GradDrop's
        # fused pass returns a fresh one each step, so it gets none (no idle second copy)
        self._g = (None if self.method.kind == "elementwise" else
                   torch.zeros(P, dtype=dt, device=dev))
        self._g_views = [] if self._g is None else [
            self._g[a:b].view_as(p) for p, a, b in zip(shared, bounds[:-1], bounds[1:])]
        self._keep = self._sparse_keep(dev, dt)
        if self._engine is not None:
            self._engine.bind(shared)
        # Grams and weights: float32 (fp32 accumulation of low-precision J), float64 for fp64
        self._wdtype = torch.float64 if dt == torch.float64 else torch.float32
        self._layout_ready = True

    def _buffer(self) -> torch.Tensor:
        """The ``[T, P]`` buffer ``J`` and its per-row views of the parameters, allocated once, on
        the first step that needs it (never, while the Linear engine takes every shared
        parameter). Each step writes every row it uses in full, so it is not zeroed."""
        if self._J is None:
            p0 = self._shared[0]
            self._J = torch.zeros(self.T, self.P, dtype=p0.dtype, device=p0.device)
            b = self._bounds
            self._J_views = [[self._J[t, x:y].view_as(p) for p, x, y in
                              zip(self._shared, b[:-1], b[1:])] for t in range(self.T)]
        return self._J

    def _sparse_keep(self, dev, dt) -> torch.Tensor | None:
        """``[P]`` 0/1 of the trainable entries of the shared parameters under sparse training."""
        inner = self.optimizer
        if not isinstance(inner, SparseTraining):
            return None
        masks = {id(p): inner.trainable_mask(p) for p in self._shared}
        if all(m is None for m in masks.values()):
            return None
        keep = torch.ones(self.P, dtype=dt, device=dev)
        bounds = self._bounds
        for p, a, b in zip(self._shared, bounds[:-1], bounds[1:]):
            m = masks[id(p)]
            if m is not None:
                keep[a:b] = m.reshape(-1).to(dt)
        return keep

    # --- per-task backward ---------------------------------------------------------------------
    @staticmethod
    def _task_roots(losses: Any) -> tuple[list[torch.Tensor | GradientEdge], list[torch.Tensor],
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
            stack = _stack_node(losses)
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

    def _per_task_backward(self, roots, seeds, retain_graph: bool,
                           engine: LinearEngine | None = None) -> None:
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

        With ``engine`` (the Linear engine, :mod:`gradops.optim._linear_engine`), the weights and
        biases of its active layers are not backward inputs: the gradient edges of the layers'
        outputs are, so each pass computes the layers' output gradients (which the engine's
        hooks copy) but not their weight gradients, and their columns of ``J`` are left
        alone."""
        T = len(roots)
        shared, specific = self._shared, self._specific
        skip = engine.covered() if engine is not None else set()   # in factored form instead
        via_j = [i for i in range(len(shared)) if i not in skip]
        inputs = [shared[i] for i in via_j] + specific + (engine.edges() if skip else [])
        if via_j:
            self._buffer()
        rows = self._J_views
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

    # --- the step ------------------------------------------------------------------------------
    def _scale(self) -> torch.Tensor | None:
        sc = self.grad_scaler
        if sc is None or not sc.is_enabled():
            return None
        if getattr(sc, "_scale", None) is None:
            return None
        return sc._scale.to(torch.float32).reshape(())

    def backward(self, losses: Sequence[torch.Tensor] | torch.Tensor, *,
                 retain_graph: bool = False) -> MTLStepInfo:
        """Per-task gradients -> the method -> the combined gradient in the parameters' ``.grad``.

        Args:
            losses: T scalar task losses (a list, or a 1-D tensor), scaled by ``GradScaler`` when
                AMP is used.
            retain_graph: keep the graph after the last task's backward.
        Returns:
            :class:`MTLStepInfo` (device tensors).
        """
        if self.method.kind == "loss":
            losses = self._loss_terms(losses)
        roots, seeds, values, separate = self._task_roots(losses)
        T = len(roots)
        if not self._layout_ready:
            if not separate and self._shared_arg == "auto":
                raise ValueError("MTLOptimizer.backward: shared='auto' needs the losses as a list "
                                 "or a torch.stack of the task losses (this 1-D tensor mixes them "
                                 "in its graph); pass shared= explicitly")
            self._build_layout(roots, T)
        elif T != self.T:
            raise ValueError(f"MTLOptimizer.backward: got {T} losses, but this optimizer was set "
                             f"up with T = {self.T} on its first step")
        kind = self.method.kind
        self._step += 1
        recompute = self._weights is None or (self._step - 1) % self.update_every == 0
        if (self._summed() and not self.stats_enabled) or (kind == "gram" and not recompute):
            return self._weighted_backward(roots, seeds, values, retain_graph)

        engine = self._engine
        use_engine = engine is not None and engine.begin(roots, T) > 0   # (None for GradDrop)
        try:
            self._per_task_backward(roots, seeds, retain_graph, engine if use_engine else None)
        finally:
            if engine is not None:
                engine.end()
        J = self._J        # None when the Linear engine took every shared parameter
        runs = self._uncovered_runs(engine) if use_engine else []
        if self.process_group is not None and self.sync == "global":
            self._reducer.all_reduce_mean(J)
            self._reducer.reduce_grads(self._specific)
        if self._keep is not None:
            J.mul_(self._keep)
        info = MTLStepInfo()
        need_layers = self.stats_enabled or kind == "layer"
        if need_layers:
            Gl = self._layer_grams(J, engine, runs) if use_engine else \
                segment_gram(J, self._offsets)
            G = Gl.sum(0)
            info.layer_gram = Gl
        elif kind != "elementwise":    # GradDrop needs no Gram (computed with stats=True)
            G = self._gram(J, engine, runs) if use_engine else gram(J)
        if kind != "elementwise" or need_layers:
            info.gram = G
            info.conflict_incidence = metrics.conflict_incidence(G)
        if self.stats_enabled:
            info.layer_conflicts = metrics.conflict_counts(Gl, 0.0)
            info.layer_gms = mean_pairs(metrics.gms(Gl))

        g, views = self._g, self._g_views
        if kind == "elementwise":
            g = self.method.combine(J, self._context(values))
            views = [g[a:b].view_as(p) for p, a, b in zip(self._shared, self._bounds[:-1],
                                                          self._bounds[1:])]
        else:
            w, converged = self._weights_from(G, info.layer_gram, values)
            info.weights, info.converged = w, converged
            if use_engine:
                self._combine_with(engine, J, w, g, runs)
            else:
                combine(J, w, self._offsets if w.dim() == 2 else None, out=g)
        if engine is not None:
            engine.release()
        if self.process_group is not None and self.sync == "local":
            self._reducer.all_reduce_mean(g)
            self._reducer.reduce_grads(self._specific)
        for p, v in zip(self._shared, views):
            p.grad = v
        self._stats.accumulate(info)
        return info

    # --- the Linear engine's share of the Gram and combine stages -----------------------------
    def _uncovered_runs(self, engine: LinearEngine) -> list[tuple[int, int]]:
        """Runs ``[i0, i1)`` of consecutive shared parameters no active Linear layer covers."""
        covered = engine.covered()
        runs, i0 = [], None
        for i in range(self.L + 1):
            if i < self.L and i not in covered:
                i0 = i if i0 is None else i0
            elif i0 is not None:
                runs.append((i0, i))
                i0 = None
        return runs

    def _run_offsets(self, i0: int, i1: int) -> torch.Tensor:
        """The segment table of shared parameters ``[i0, i1)`` within their columns of ``J``."""
        return self._offsets_cpu[i0:i1 + 1] - self._offsets_cpu[i0]

    def _gram(self, J: torch.Tensor | None, engine: LinearEngine,
              runs: list[tuple[int, int]]) -> torch.Tensor:
        """``G = J J^T``: active factored layers from their factors, the other ``runs`` of
        parameters from ``J``."""
        b = self._bounds
        parts = [G for l in engine.active() for _, G in engine.param_grams(l)]
        parts += [gram(J[:, b[i0]:b[i1]]) for i0, i1 in runs if b[i1] > b[i0]]
        return torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]

    def _layer_grams(self, J: torch.Tensor | None, engine: LinearEngine,
                     runs: list[tuple[int, int]]) -> torch.Tensor:
        """Per-parameter Grams ``[L, T, T]``: active factored layers from their factors, the other
        ``runs`` of parameters from ``J``."""
        b = self._bounds
        Gl = torch.zeros(self.L, self.T, self.T, dtype=self._wdtype,
                         device=self._shared[0].device)
        for l in engine.active():
            for i, G in engine.param_grams(l):
                Gl[i] = G
        for i0, i1 in runs:
            Gl[i0:i1] = segment_gram(J[:, b[i0]:b[i1]], self._run_offsets(i0, i1))
        return Gl

    def _combine_with(self, engine: LinearEngine, J: torch.Tensor | None, w: torch.Tensor,
                      g: torch.Tensor, runs: list[tuple[int, int]]) -> None:
        """``g = w^T J`` (per parameter for ``[L, T]`` weights): active factored layers from their
        factors, the other ``runs`` of parameters from ``J``."""
        b, per = self._bounds, w.dim() == 2
        views = self._g_views
        for l in engine.active():
            bi = l.b_index
            engine.combine_into(l, w[l.w_index] if per else w,
                                None if bi is None else (w[bi] if per else w),
                                views[l.w_index], None if bi is None else views[bi])
        for i0, i1 in runs:
            if b[i1] == b[i0]:
                continue
            if per:
                combine(J[:, b[i0]:b[i1]], w[i0:i1], self._run_offsets(i0, i1),
                        out=g[b[i0]:b[i1]])
            else:
                combine(J[:, b[i0]:b[i1]], w, out=g[b[i0]:b[i1]])

    def _weighted_backward(self, roots, seeds, values, retain_graph) -> MTLStepInfo:
        """One backward of ``sum_t w_t L_t`` (EW, a loss-level method's terms, or the steps
        between weight updates)."""
        if self._engine is not None:     # the Linear engine has nothing to do this step
            self._engine.idle()
        if self.method.kind == "gram":
            w = self._weights
        else:
            w = self._sum_weights(len(roots), values.device, torch.float32)
        for p in self._shared:            # fresh gradients, as with a plain backward
            p.grad = None
        torch.autograd.backward(roots, grad_tensors=[s * w[t].to(s.dtype).to(s.device)
                                                     for t, s in enumerate(seeds)],
                                retain_graph=retain_graph)
        if self._reducer is not None:
            self._reducer.reduce_grads(self._shared + self._specific)
        info = MTLStepInfo(weights=w)
        self._stats.accumulate(info)
        return info

    def _summed(self) -> bool:
        """Whether the method's update is a fixed sum of the (terms') gradients."""
        m = self.method
        return m.kind == "sum" or (m.kind == "loss" and not m.weights_from_gram)

    def _sum_weights(self, T: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """EW's weights; a loss-level method's terms are summed (weights 1)."""
        if self.method.kind == "sum":
            return self.method.weights(T, device, dtype)
        return torch.ones(T, dtype=dtype, device=device)

    def _context(self, values: torch.Tensor | None) -> StepContext:
        """The step's :class:`~gradops.weighting.StepContext` (``values``: the losses as given
        to :meth:`backward`, unscaled here)."""
        scale = self._scale()
        if values is not None and scale is not None:
            values = values / scale
        return StepContext(generator=self._generator, losses=values, scale=scale,
                           dtype=self._wdtype)

    def _weights_from(self, G: torch.Tensor, Gl: torch.Tensor | None, values: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        method, kind = self.method, self.method.kind
        T = G.shape[-1]
        if self._summed():
            return self._sum_weights(T, G.device, self._wdtype), None
        ctx = self._context(values)
        if kind == "layer":
            return method.weights(Gl, ctx), None
        scale = ctx.scale
        Gs = G if scale is None or method.scale_invariant else G / (scale * scale)
        w, status = method.weights(Gs, ctx)
        converged = None
        if status is not None:
            converged = status.converged
            finite = torch.isfinite(G).all()
            self._stats.count_failure((~converged) & finite)
            # residual = inf: the solver says no solution exists (Nash-MTL at a Pareto-stationary
            # point), counted apart as well
            self._stats.count_no_solution(torch.isinf(status.residual) & finite)
        w = w.to(device=G.device, dtype=self._wdtype)
        prev = self._weights
        self._weights = w if prev is None else torch.where(torch.isfinite(w), w, prev)
        return w, converged

    # --- loss-level methods ---------------------------------------------------------------------
    def _setup_loss_method(self, num_tasks: int | None) -> None:
        """Set a loss-level method up for ``num_tasks`` now (its parameters join the inner
        optimizer as a parameter group), or on the first :meth:`backward`."""
        m = self.method
        self._method_ready = not isinstance(m, LossMethod)
        if num_tasks is not None and (isinstance(num_tasks, bool) or
                                      not isinstance(num_tasks, int) or num_tasks < 1):
            raise ValueError(f"MTLOptimizer: num_tasks must be an int >= 1, got {num_tasks!r}")
        if self._method_ready:
            return
        if num_tasks is None:
            if m.has_parameters:
                raise ValueError(f"MTLOptimizer: method {m.name!r} learns per-task parameters "
                                 "that the optimizer must hold from the start: pass num_tasks=T")
            return
        params = self._params()
        m.setup(num_tasks, params[0].device if params else torch.device("cpu"))
        if m.parameters():
            self.optimizer.add_param_group({"params": m.parameters()})
        self._method_ready = True

    def _loss_values(self, losses: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The detached losses ``[T]`` in float32, averaged over the process group."""
        values = torch.stack([l.detach().float().reshape(()) for l in losses])
        if self.process_group is not None:
            world = torch.distributed.get_world_size(self.process_group)
            torch.distributed.all_reduce(values, group=self.process_group)
            values = values / world
        return values

    def _loss_terms(self, losses: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """A loss-level method's per-task terms of ``losses``."""
        items = list(losses.unbind(0)) if isinstance(losses, torch.Tensor) else list(losses)
        if not items:
            raise ValueError("MTLOptimizer.backward: losses is empty")
        m = self.method
        if not self._method_ready:
            m.setup(len(items), items[0].device)
            self._method_ready = True
        elif len(items) != m.T:
            raise ValueError(f"MTLOptimizer.backward: got {len(items)} losses, but method "
                             f"{m.name!r} was set up for {m.T} tasks")
        ctx = self._context(None)
        values = self._loss_values(items)
        if ctx.scale is not None:
            values = values / ctx.scale
        ctx.losses = values
        self._loss_sum = values if self._loss_sum is None else self._loss_sum + values
        self._loss_steps += 1
        return m.terms(items, values, ctx)

    def end_epoch(self, mean_losses: torch.Tensor | None = None) -> None:
        """Tell a loss-level method that an epoch ended (DWA reweights from the epoch's mean
        losses): ``mean_losses`` ``[T]``, or the mean of the losses :meth:`backward` saw since the
        last call. Does nothing for the other methods."""
        m = self.method
        if not isinstance(m, LossMethod):
            return
        if mean_losses is None:
            if self._loss_sum is None:
                raise ValueError("MTLOptimizer.end_epoch: no backward since the last call; pass "
                                 "mean_losses")
            mean_losses = self._loss_sum / self._loss_steps
        if self._method_ready:
            m.end_epoch(mean_losses.detach().float())
        self._loss_sum, self._loss_steps = None, 0

    # --- statistics ----------------------------------------------------------------------------
    def stats(self, reset: bool = True) -> dict[str, Any]:
        """Means over the steps since the last reset: ``weights``, ``conflict_incidence`` and,
        with ``stats=True``, ``layer_conflicts`` / ``layer_gms``; plus ``steps`` and
        ``nonconverged`` (solver failures), ``no_solution`` (of those, the steps whose solver
        found that no solution exists: Nash-MTL at a Pareto-stationary point, update 0), and
        ``factored_layers`` (how many ``nn.Linear`` layers the last step took in factored form,
        :attr:`factored_layers`). Reading this
        synchronises with the device (meant for logging once per epoch); a non-zero failure
        count also raises a ``RuntimeWarning``."""
        out = self._stats.summary(self.method.name, reset)
        out["factored_layers"] = len(self.factored_layers)
        return out

    @property
    def nonconverged_steps(self) -> int:
        """Total solver failures since construction (synchronises)."""
        return self._stats.nonconverged_total

    # --- optimizer interface -------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """The inner optimizer's step on the combined gradients.

        For a loss-level method that re-evaluates the losses after the step (FAMO), ``closure``
        is required: it returns the T losses of the same batch (a list or a 1-D tensor) and runs
        under ``torch.no_grad()`` after the inner step; the method then updates its state from
        them. With ``GradScaler``, pass it positionally: ``scaler.step(opt, closure)`` (a step
        the scaler skips runs no closure). For every other method, ``closure`` goes to the inner
        optimizer as usual (it must call :meth:`backward` itself)."""
        m = self.method
        if not (isinstance(m, LossMethod) and m.needs_closure):
            return self.optimizer.step(closure)
        if closure is None:
            raise ValueError(f"MTLOptimizer.step: method {m.name!r} re-evaluates the losses "
                             "after the step: call opt.step(closure), closure() returning the T "
                             "losses of the same batch")
        out = self.optimizer.step()
        with torch.no_grad():
            new = closure()
        if self._method_ready:
            m.after_step(self._loss_values(new))
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients (each :meth:`backward` overwrites the per-task buffer
        row by row, so it needs no clearing)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``"mtl"``: the method's name and state (GradVac
        targets, last weights), the step count and the generator state."""
        sd = dict(self.optimizer.state_dict())
        mtl: dict[str, Any] = {"method": self.method.name, "step": self._step,
                               "method_state": _clone(self.method.state_dict()),
                               "weights": None if self._weights is None else self._weights.clone()}
        if self._own_generator:
            mtl["generator"] = self._generator.get_state()
        if isinstance(self.method, LossMethod) and self._method_ready:
            mtl["num_tasks"] = self.method.T
        sd["mtl"] = mtl
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, or an inner-only one (the method then
        starts fresh)."""
        sd = dict(state_dict)
        mtl = sd.pop("mtl", None)
        self.optimizer.load_state_dict(sd)
        if mtl is None:
            return
        name = self.method.name
        # before the registry, per-layer PCGrad saved its state as "pcgrad"
        if mtl["method"] != name and (mtl["method"], name) != ("pcgrad", "pcgrad-layer"):
            raise ValueError(f"MTLOptimizer.load_state_dict: state of method {mtl['method']!r}, "
                             f"this optimizer runs {name!r}")
        self._step = int(mtl["step"])
        self._weights = None if mtl["weights"] is None else mtl["weights"].clone()
        if "generator" in mtl and self._own_generator:
            self._generator.set_state(mtl["generator"])
        dev = self._generator.device
        state = mtl["method_state"]
        if state and not self._method_ready:       # a loss-level method not set up yet
            if "num_tasks" not in mtl:
                raise ValueError("MTLOptimizer.load_state_dict: the state holds no num_tasks "
                                 f"for method {name!r}; construct with num_tasks=T")
            self._setup_loss_method(int(mtl["num_tasks"]))
        self.method.load_state_dict(_clone(state))
        if self._weights is not None:
            self._weights = self._weights.to(dev)


def _clone(state: Any) -> Any:
    """A deep copy of a method's state: tensors cloned, containers copied."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_clone(v) for v in state)
    return state
