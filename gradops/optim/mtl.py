"""``MTLOptimizer``: any torch optimizer, driven by a multi-task gradient method (docs/optim.md:
the data path, memory, the factored engine; docs/methods.md#mtloptimizer-data-path).

A step: ``T`` backward passes (:mod:`._per_task`, from the roots of :mod:`._roots`), each copying
task ``t``'s gradient of the shared parameters into row ``t`` of one flat ``[T, P]`` buffer ``J``
(:mod:`._layout`) -> Gram ``G = J J^T`` (per-layer Grams in the same pass) -> weights from ``G``
on ``J``'s device -> ``w^T J`` into one flat ``[P]`` buffer whose views are the shared
parameters' ``.grad`` -> (clip, GradScaler, ...) the inner optimizer's step. ``nn.Linear`` /
``nn.Conv2d`` layers may stay in factored form ``D_t^T X`` instead (:mod:`._linear_engine`, and
its share of the Gram and combine in :mod:`._engine_share`). This module is the orchestration.

No host synchronisation in :meth:`MTLOptimizer.backward` (no ``.item()``, no data-dependent
Python branch; solvers run fixed budgets on device, random orders and seeds come from the
optimizer's own generator on device); reading :meth:`MTLOptimizer.stats` synchronises.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn

from .. import metrics
from ..ops.combine import combine
from ..ops.gram import gram, segment_gram
from ..weighting import LossMethod, Method, Options, StepContext
from ._distributed import Distributed, distributed_from, gradient_sync
from ._engine_share import (describe_factored, engine_combine, engine_gram, engine_layer_grams,
                            linear_engine, uncovered_runs)
from ._layout import Layout, layout_attr
from ._loss_level import LossLevel
from ._linear_engine import LinearEngine
from ._methods import resolve_method
from ._per_task import per_task_backward
from ._roots import modules_of, resolve_shared, task_roots
from ._stats import MTLStepInfo, StepStats, mean_pairs
from ._wrapper import OptimizerWrapper
from .sparse_training import SparseTraining

__all__ = ["MTLOptimizer", "MTLStepInfo"]


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
            :class:`gradops.sparse.SparseMasks` with ``module=``): shorthand for passing
            ``SparseTraining(optimizer, sparse, module)`` as ``optimizer``, the grouped form
            (:class:`SparseTraining` holds the masks and its own options): either way the per-task
            gradients are masked before the Gram.
        module: the model (or its encoder): where sparse masks' parameter names and the Linear
            engine's layers are looked for.
        stats: per step, per-layer Grams, conflict counts and GMS in ``info`` (same pass), and
            per-task gradients even for EW.
        generator: the source of random orders (PCGrad, GradVac) and GradDrop's seeds; default:
            a new generator seeded from torch's global RNG (saved in :meth:`state_dict`).
        grad_scaler: the :class:`torch.amp.GradScaler` whose scaled losses reach :meth:`backward`;
            weightings that are not scale-invariant (Nash-MTL, MGDA with loss normalisation) then
            see the unscaled Gram. Scale-invariant methods need not pass it.
        distributed: a :class:`Distributed` (``ddp_model``, ``process_group``, ``sync``,
            ``bucket_mb``): average the gradients over a process group, once per step. Default:
            single process. The separate keywords ``ddp_model=``, ``process_group=``, ``sync=``,
            ``bucket_mb=`` still work for one release, with a :class:`DeprecationWarning`.
        linear_gram: ``"auto"`` (default), ``"on"`` or ``"off"``: keep the per-task gradients
            of ``nn.Linear`` and ``nn.Conv2d`` layers (``groups=1``, symmetric zero padding)
            among the shared parameters in factored form (input and per-task output gradients;
            the per-task weight gradients are never computed) and take their Gram and combined
            gradient from the factors (:func:`gradops.linear_gram`; same results up to float32
            rounding). ``"auto"``: on CPU where a cost model says it is cheaper
            (:mod:`gradops.optim._linear_engine`); ``"on"``: every eligible layer, any device.
            Layers are looked for in the modules passed as ``shared`` or ``module``, else found
            on the first step's forward; :attr:`factored_layers` and ``repr`` say which were
            taken. Not used with a process group, sparse masks (``"on"`` is refused there) or
            GradDrop.
        **options: deprecated: the method's options as keywords (``c=0.4``); use
            ``method_options=`` or a method object. Each method's options are its Options
            dataclass (docs/methods.md), e.g. ``c`` (CAGrad), ``leak`` (GradDrop), ``max_norm``
            (Nash-MTL), ``normalization`` (MGDA), ``beta`` (GradVac), ``reduction``,
            ``libmtl_self_visit`` (PCGrad: task ``i`` also visits itself, LibMTL's convention;
            default ``j != i``, the paper's).
        ddp_model, process_group, sync, bucket_mb: deprecated (a :class:`DeprecationWarning`):
            the fields of ``distributed``, as separate keywords.

    Raises:
        TypeError: for an inner optimizer that is already an MTLOptimizer, a ``method``,
            ``distributed`` or ``ddp_model`` of the wrong type, an unknown method option, or
            options given both as ``method_options`` and as keywords.
        ValueError: naming the argument: an unknown method, a bad method option,
            ``update_every`` or ``num_tasks``, ``sparse=`` with an inner
            :class:`SparseTraining`, ``distributed`` with the separate keywords, or a bad
            ``linear_gram``.

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
                 distributed: Distributed | None = None, linear_gram: str = "auto",
                 ddp_model: nn.Module | None = None, process_group: Any = None,
                 sync: str | None = None, bucket_mb: float | None = None,
                 **options: Any):
        if isinstance(optimizer, MTLOptimizer):
            raise TypeError("MTLOptimizer: the inner optimizer is already an MTLOptimizer")
        dist = distributed_from(distributed, ddp_model=ddp_model, process_group=process_group,
                                sync=sync, bucket_mb=bucket_mb)
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
        self.update_every = update_every
        self.stats_enabled = bool(stats)
        self.grad_scaler = grad_scaler
        self.distributed = dist
        self.sync = dist.sync
        self._shared_arg = shared
        self._own_generator = generator is None
        if generator is None:   # on the parameters' device, seeded from torch's global RNG
            params = self._params()
            generator = torch.Generator(device=params[0].device if params else "cpu")
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self._generator = generator
        self._reducer = gradient_sync(dist)     # (switches a DDP model's own reducer off)
        process_group = self.process_group = getattr(self._reducer, "process_group", None)
        self._linear_mode = linear_gram
        self._engine: LinearEngine | None = linear_engine(
            linear_gram, modules_of(shared) + ([module] if module is not None else []),
            [p for p in self._params() if p.requires_grad], process_group is not None,
            isinstance(optimizer, SparseTraining), self.method.kind == "elementwise")
        self._layout: Layout | None = None                # fixed on the first step
        self._layout_ready = False
        self._step = 0
        self._weights: torch.Tensor | None = None           # last weights (update_every, state)
        self._stats = StepStats()
        self._wdtype = torch.float32          # of Grams and weights; set with the layout
        if num_tasks is not None and (isinstance(num_tasks, bool) or
                                      not isinstance(num_tasks, int) or num_tasks < 1):
            raise ValueError(f"MTLOptimizer: num_tasks must be an int >= 1, got {num_tasks!r}")
        params = self._params()
        self._loss_level = None if not isinstance(self.method, LossMethod) else LossLevel(
            self.method, self.optimizer, num_tasks,
            params[0].device if params else torch.device("cpu"))

    def __repr__(self) -> str:
        return (f"MTLOptimizer(method={self.method!r}, linear_gram={self._linear_mode!r}, "
                f"factored_layers={describe_factored(self._engine, self._layout_ready)}, "
                f"{self.optimizer!r})")

    @property
    def factored_layers(self) -> tuple[nn.Module, ...]:
        """The ``nn.Linear`` / ``nn.Conv2d`` modules whose per-task gradients the last step that
        formed per-task gradients kept in factored form (the Linear engine, ``linear_gram=``);
        every other shared parameter went through ``J``. Empty before the first step and with
        ``linear_gram="off"``."""
        engine = self._engine
        return () if engine is None else tuple(l.module for l in engine.last_taken)

    # --- layout: shared parameters, the flat buffers and their views (._layout) ---------------
    _shared = layout_attr("shared")
    _specific = layout_attr("specific")
    _offsets = layout_attr("offsets")
    _offsets_cpu = layout_attr("offsets_cpu")
    _bounds = layout_attr("bounds")
    _J = layout_attr("J")
    _g = layout_attr("g")
    _g_views = layout_attr("g_views")

    def _build_layout(self, roots, separate: bool) -> None:
        params, T = [p for p in self._params() if p.requires_grad], len(roots)
        shared = resolve_shared(self._shared_arg, params, roots, separate)
        self._layout = lay = Layout(shared, params, T, self.method.kind != "elementwise",
                                    self.optimizer)
        dt = lay.dtype
        self.T, self.P, self.L = T, lay.P, lay.L
        if self._engine is not None:
            self._engine.bind(shared)
        # Grams and weights: float32 (fp32 accumulation of low-precision J), float64 for fp64
        self._wdtype = torch.float64 if dt == torch.float64 else torch.float32
        self._layout_ready = True

    # --- the step ------------------------------------------------------------------------------
    def _scale(self) -> torch.Tensor | None:
        """The GradScaler's current scale, 0-dim float32 on the parameters' device, read through
        its public API without a host sync (``scale(1)``); None without an enabled scaler."""
        sc = self.grad_scaler
        if sc is None or not sc.is_enabled():
            return None
        dev = self._layout.device if self._layout is not None else self._params()[0].device
        return sc.scale(torch.ones((), device=dev))

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
        if self._loss_level is not None:
            losses = self._loss_level.terms(losses, self._context(None), self.process_group,
                                            self.optimizer)
        roots, seeds, values, separate = task_roots(losses)
        T = len(roots)
        if not self._layout_ready:
            self._build_layout(roots, separate)
        elif T != self.T:
            raise ValueError(f"MTLOptimizer.backward: got {T} losses, but this optimizer was set "
                             f"up with T = {self.T} on its first step")
        kind = self.method.kind
        self._step += 1
        recompute = self._weights is None or (self._step - 1) % self.update_every == 0
        if (self._summed() and not self.stats_enabled) or (kind == "gram" and not recompute):
            return self._weighted_backward(roots, seeds, values, retain_graph)

        engine = self._engine                      # (None for GradDrop)
        use_engine = per_task_backward(self._layout, roots, seeds, retain_graph, engine)
        J = self._J        # None when the Linear engine took every shared parameter
        runs = uncovered_runs(engine, self.L) if use_engine else []
        if self.process_group is not None and self.sync == "global":
            self._reducer.all_reduce_mean(J)
            self._reducer.reduce_grads(self._specific)
        if self._layout.keep is not None:        # sparse training: the trainable entries only
            J.mul_(self._layout.keep)
        info = MTLStepInfo()
        need_layers = self.stats_enabled or kind == "layer"
        if need_layers:
            Gl = engine_layer_grams(self._layout, J, engine, runs, self._wdtype) if use_engine \
                else segment_gram(J, self._offsets)
            G = Gl.sum(0)
            info.layer_gram = Gl
        elif kind != "elementwise":    # GradDrop needs no Gram (computed with stats=True)
            G = engine_gram(self._layout, J, engine, runs) if use_engine else gram(J)
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

    def _combine_with(self, engine: LinearEngine, J: torch.Tensor | None, w: torch.Tensor,
                      g: torch.Tensor, runs: list[tuple[int, int]]) -> None:
        """``g = w^T J`` with the Linear engine's share (:func:`._engine_share.engine_combine`)."""
        engine_combine(self._layout, engine, J, w, g, runs)

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

    def end_epoch(self, mean_losses: torch.Tensor | None = None) -> None:
        """Tell a loss-level method that an epoch ended (DWA reweights from the epoch's mean
        losses): ``mean_losses`` ``[T]``, or the mean of the losses :meth:`backward` saw since the
        last call. Does nothing for the other methods.

        Args:
            mean_losses: the epoch's mean training losses ``[T]``, or None for the mean of the
                losses :meth:`backward` saw.
        """
        if self._loss_level is not None:
            self._loss_level.end_epoch(mean_losses)

    # --- statistics ----------------------------------------------------------------------------
    def stats(self, reset: bool = True) -> dict[str, Any]:
        """Means over the steps since the last reset: ``weights``, ``conflict_incidence`` and,
        with ``stats=True``, ``layer_conflicts`` / ``layer_gms``; plus ``steps`` and
        ``nonconverged`` (solver failures), ``no_solution`` (of those, the steps whose solver
        found that no solution exists: Nash-MTL at a Pareto-stationary point, update 0), and
        ``factored_layers`` (how many ``nn.Linear`` layers the last step took in factored form,
        :attr:`factored_layers`). Reading this
        synchronises with the device (meant for logging once per epoch); a non-zero failure
        count also raises a ``RuntimeWarning``.

        Args:
            reset: start the next means afresh (False: keep accumulating).

        Returns:
            A dict: the counts as ints, the means as tensors.
        """
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
        optimizer as usual (it must call :meth:`backward` itself).

        Args:
            closure: see above; None for a plain step.

        Returns:
            The inner optimizer's return value.

        Raises:
            ValueError: when the method needs a closure and none is given.
        """
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
        self._loss_level.after_step(new, self.process_group)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``"mtl"``: the method's name and state (GradVac
        targets, last weights), the step count and the generator state."""
        sd = dict(self.optimizer.state_dict())
        mtl: dict[str, Any] = {"method": self.method.name, "step": self._step,
                               "method_state": _clone(self.method.state_dict()),
                               "weights": None if self._weights is None else self._weights.clone()}
        if self._own_generator:
            mtl["generator"] = self._generator.get_state()
        if self._loss_level is not None and self._loss_level.ready:
            mtl["num_tasks"] = self.method.T
        sd["mtl"] = mtl
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, or an inner-only one (the method then
        starts fresh).

        Args:
            state_dict: a dict returned by :meth:`state_dict` (or the inner optimizer's).

        Raises:
            ValueError: for the state of another method, or a loss-level method's state without
                its number of tasks when the optimizer was built without ``num_tasks``.
        """
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
        lvl = self._loss_level
        if state and lvl is not None and not lvl.ready:     # a loss-level method not set up yet
            if "num_tasks" not in mtl:
                raise ValueError("MTLOptimizer.load_state_dict: the state holds no num_tasks "
                                 f"for method {name!r}; construct with num_tasks=T")
            lvl.setup(int(mtl["num_tasks"]), dev, self.optimizer)
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
