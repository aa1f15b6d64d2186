"""The method registry: every multi-task method gradops knows is one class in one module of
:mod:`gradops.weighting`, declared with :func:`register`.

A method declares its name (one spelling: lower case, words joined by ``-``), its kind, its
display name, its paper, its options (a small frozen dataclass with defaults and checks), whether
its weights are invariant to scaling every task gradient by the same ``s > 0``, and the function
of its kind. Everything else reads the registry: :class:`gradops.optim.MTLOptimizer`, the
trainer's ``--method`` / ``--method-opt``, ``gradops compare``'s grid and report names, the
benchmarks' method lists and ``gradops info``. Adding a method is one module in
``gradops/weighting/`` plus one test file (docs/adding-a-method.md): importing
:mod:`gradops.weighting` imports every module of the package, so no list needs editing.

Kinds (what :class:`gradops.optim.MTLOptimizer` does with them):

============  ==================================================================================
kind          what it computes
============  ==================================================================================
sum           fixed weights of the task losses: one backward of their weighted sum (EW)
gram          weights ``w [T]`` from the Gram ``G = J J^T`` (:meth:`GramMethod.weights`), then
              ``d = w^T J``
layer         weights ``[L, T]`` from the per-layer Grams ``[L, T, T]``
              (:meth:`LayerMethod.weights`), then a segmented ``combine``
elementwise   the combined gradient from one pass over ``J`` (:meth:`ElementwiseMethod.combine`)
loss          per-task terms from the losses (:meth:`LossMethod.terms`), summed (EW over them);
              methods that re-evaluate the losses after the step take ``opt.step(closure)``
trainer       a mode of the bundled trainer (one model per task, task-group updates), not an
              optimizer method
============  ==================================================================================

Names are looked up ignoring case, ``-`` and ``_`` (``"IMTL-G"``, ``"pcgrad_layer"`` work); the
registered spelling is the one runs, reports and benchmarks print.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Union

import torch

__all__ = ["KINDS", "Method", "SumMethod", "GramMethod", "LayerMethod", "ElementwiseMethod",
           "LossMethod", "TrainerMode", "Options", "NoOptions", "StepContext", "register",
           "get_method", "create_method", "method_names", "all_methods", "canonical_name",
           "parse_option_value"]

KINDS = ("sum", "gram", "layer", "elementwise", "loss", "trainer")
"""The kinds, in the order listings use."""


# --- options ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """Base of a method's options: a frozen dataclass whose fields are the options, with their
    defaults. Values are checked against the field types on construction (``int`` is accepted
    for ``float``); a subclass adds its range checks in :meth:`check`, raising ``ValueError``
    through :meth:`fail` so that the message names the option."""

    _method: ClassVar[str] = "?"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            v = getattr(self, f.name)
            want = _simple_types(hints.get(f.name))
            if want is None:                  # a type the subclass checks itself
                continue
            if float in want and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
                object.__setattr__(self, f.name, v)
            ok = any((t is type(None) and v is None) or
                     (t is not type(None) and isinstance(v, t) and
                      not (t in (int, float) and isinstance(v, bool)))
                     for t in want)
            if not ok:
                names = " or ".join("None" if t is type(None) else t.__name__ for t in want)
                self.fail(f.name, f"must be {names}, got {v!r}")
        self.check()

    def check(self) -> None:
        """Range checks of a subclass (call :meth:`fail`)."""

    def fail(self, option: str, why: str) -> None:
        """Reject a value: raise the error that names the method and the option.

        Args:
            option: the option's (field's) name.
            why: what is wrong with its value (``"must be >= 0, got -1"``).

        Raises:
            ValueError: always, ``method 'NAME': option 'OPTION' WHY``.
        """
        raise ValueError(f"method {self._method!r}: option {option!r} {why}")

    def check_nonnegative(self, *options: str) -> None:
        """Each of ``options`` is >= 0 (None allowed: an unset optional value).

        Args:
            options: the names of the options (fields) to check.

        Raises:
            ValueError: through :meth:`fail`, for a negative (or NaN) value.
        """
        for k in options:
            v = getattr(self, k)
            if v is not None and not v >= 0:
                self.fail(k, f"must be >= 0, got {v}")

    def check_choice(self, option: str, choices: tuple[Any, ...]) -> None:
        """``option`` is one of ``choices``.

        Args:
            option: the option's (field's) name.
            choices: its valid values.

        Raises:
            ValueError: through :meth:`fail`, for a value not in ``choices``.
        """
        if getattr(self, option) not in choices:
            self.fail(option, f"must be one of {choices}, got {getattr(self, option)!r}")

    def as_dict(self) -> dict[str, Any]:
        """The options as a dict ``{field name: value}``, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class NoOptions(Options):
    """The options of a method that has none."""


def _simple_types(hint: Any) -> tuple[type, ...] | None:
    """``float`` -> ``(float,)``, ``float | None`` -> ``(float, NoneType)``; None for other
    hints (tuples, Literal, Any...)."""
    simple = (bool, int, float, str, type(None))
    if hint in simple:
        return (hint,)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if all(a in simple for a in args):
            return tuple(args)
    return None


def parse_option_value(method: type[Method], option: str, text: str) -> Any:
    """The value of ``option`` of ``method`` from its text form (the trainer's
    ``--method-opt KEY=VALUE``): by the field's type; ``none`` for None, ``true`` / ``false`` for
    booleans; tuples as ``a/b/c``.

    Args:
        method: the method class (its :class:`Options` dataclass gives the field's type).
        option: the option's name.
        text: the value as text.

    Returns:
        The value, of the field's type.

    Raises:
        ValueError: naming the method and the option, for an unknown option or a text that is
            not a value of the field's type.
    """
    opts = {f.name: f for f in fields(method.Options)}
    if option not in opts:
        raise ValueError(f"method {method.name!r} has no option {option!r}; its options: "
                         f"{', '.join(opts) or 'none'}")
    hint = typing.get_type_hints(method.Options).get(option)
    want = _simple_types(hint)
    t = text.strip()
    if want is not None and type(None) in want and t.lower() == "none":
        return None
    if want is None:                      # e.g. GradDrop's leak: a float, or floats a/b/c
        for read in (float, lambda x: tuple(float(v) for v in x.split("/"))):
            try:
                return read(t)
            except ValueError:
                pass
        raise ValueError(f"method {method.name!r}: option {option!r} cannot read {text!r} as "
                         "a number or numbers a/b/c")
    for ty in want:
        if ty is type(None):
            continue
        if ty is bool:
            low = t.lower()
            if low in ("true", "1", "yes", "false", "0", "no"):
                return low in ("true", "1", "yes")
            continue
        if ty is str:
            return t
        try:
            return ty(t)
        except ValueError:
            continue
    raise ValueError(f"method {method.name!r}: option {option!r} cannot read {text!r} as "
                     f"{getattr(hint, '__name__', hint)}")


# --- the step's context ---------------------------------------------------------------------
@dataclass
class StepContext:
    """What a method may use besides its Gram / ``J`` / losses, on the device.

    Attributes:
        generator: the optimizer's generator (random orders, seeds, random weights).
        losses: the detached task losses ``[T]`` (unscaled by AMP; averaged over the processes
            when a process group is used), or None.
        scale: GradScaler's scale as a 0-dim device tensor, or None without AMP scaling.
        dtype: the working dtype of Grams and weights (float32; float64 for float64 gradients).
    """

    generator: torch.Generator | None = None
    losses: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32


# --- methods ----------------------------------------------------------------------------------
class Method:
    """Base of every method. A subclass sets the class attributes below, implements the function
    of its kind, and is registered with :func:`register`.

    Args:
        options: the method's options as its :class:`Options` dataclass, or None to build them
            from ``kwargs`` (the defaults when there are none).
        kwargs: the options by name (``CAGrad(c=0.4)``), instead of ``options``.

    Raises:
        TypeError: for an option the method does not have, for both ``options`` and ``kwargs``,
            or for an ``options`` of another method's dataclass.
        ValueError: for an option value of the wrong type or out of its range (the message
            names the option).

    Class attributes:
        name: the one spelling (lower case, ``-`` between words).
        kind: one of :data:`KINDS` (set by the kind's base class).
        display: the name reports print (e.g. ``"IMTL-G"``).
        paper: authors, title, venue and year.
        Options: the options dataclass (a subclass of :class:`Options`).
        scale_invariant: the weights are unchanged when every task gradient is scaled by the same
            ``s > 0`` (so GradScaler's scaled gradients need no unscaling for the method).
        iterative: the method runs an iterative solver whose status may say "not converged".
        random: the method draws from the optimizer's generator.
        permutation_equivariant: permuting the tasks permutes the weights (False for a method
            that treats the tasks asymmetrically by design, e.g. PCD's primary task).
        order: position in listings (the built-in methods are numbered; new ones sort after by
            name).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    display: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = NoOptions
    scale_invariant: ClassVar[bool] = True
    iterative: ClassVar[bool] = False
    random: ClassVar[bool] = False
    permutation_equivariant: ClassVar[bool] = True
    order: ClassVar[int] = 1000

    def __init__(self, options: Options | None = None, **kwargs: Any):
        if options is None:
            names = {f.name for f in fields(self.Options)}
            bad = sorted(set(kwargs) - names)
            if bad:
                raise TypeError(f"method {self.name!r} takes no option(s) {bad}; its options: "
                                f"{sorted(names) or 'none'}")
            options = self.Options(**kwargs)
        elif kwargs:
            raise TypeError(f"method {self.name!r}: pass options= or keyword options, not both")
        elif not isinstance(options, self.Options):
            raise TypeError(f"method {self.name!r}: options must be a {self.Options.__name__}, "
                            f"got {type(options).__name__}")
        self.options = options

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.as_dict().items())
        return f"{type(self).__name__}({opts})"

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The declaration as plain data (``gradops info``, docs): name, kind, display, paper,
        options with their defaults, scale invariance, iterative, random."""
        opts = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                for f in fields(cls.Options)}
        return {"name": cls.name, "kind": cls.kind, "display": cls.display, "paper": cls.paper,
                "options": {k: v if isinstance(v, (int, float, str, bool, type(None))) else
                            repr(v) for k, v in opts.items()},
                "scale_invariant": cls.scale_invariant, "iterative": cls.iterative,
                "random": cls.random, "permutation_equivariant": cls.permutation_equivariant}

    def torchjd(self, T: int) -> Any:
        """TorchJD's aggregator of the same method with the same options (benchmarks and
        agreement tests), or None where TorchJD has none. Imports ``torchjd`` (an optional
        dependency: ImportError without it).

        Args:
            T: the number of tasks (for aggregators built for a fixed ``T``).

        Returns:
            A ``torchjd`` aggregator, or None.

        Raises:
            ImportError: when ``torchjd`` is not installed and the method has an aggregator.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """The method's state (tensors), saved in the optimizer's state dict."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Args:
            state: a dict returned by :meth:`state_dict` of the same method.

        Raises:
            ValueError: for keys the method does not keep (a stateless method takes ``{}``
                only).
        """
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, got keys {sorted(state)}")


class SumMethod(Method):
    """Fixed weights of the task losses (one backward of the weighted sum unless statistics
    need the per-task gradients)."""

    kind = "sum"

    def weights(self, T: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The loss weights.

        Args:
            T: the number of tasks.
            device: the device of the weights.
            dtype: their dtype.

        Returns:
            The weights ``[T]``.
        """
        raise NotImplementedError


class GramMethod(Method):
    """Weights ``w [T]`` from the Gram; the update is ``d = w^T J``."""

    kind = "gram"

    def weights(self, G: torch.Tensor, ctx: StepContext
                ) -> tuple[torch.Tensor, Any]:
        """The task weights from the Gram.

        Args:
            G: the Gram ``J J^T`` ``[T, T]`` in ``ctx.dtype``.
            ctx: the step's context (generator, losses, AMP scale, dtype).

        Returns:
            ``(w, status)``: ``w [T]`` with the update ``d = w^T J``; ``status`` a
            :class:`~gradops.weighting.SolverStatus` (iterative methods) or None.
        """
        raise NotImplementedError


class LayerMethod(Method):
    """Weights ``[L, T]`` from the per-layer Grams ``[L, T, T]``."""

    kind = "layer"

    def weights(self, G: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The per-layer task weights.

        Args:
            G: the per-layer Grams ``[L, T, T]`` in ``ctx.dtype``.
            ctx: the step's context (generator, losses, AMP scale, dtype).

        Returns:
            The weights ``[L, T]``: layer ``l``'s update is ``w[l]^T J_l``.
        """
        raise NotImplementedError


class ElementwiseMethod(Method):
    """The combined gradient ``[P]`` from one pass over ``J [T, P]``."""

    kind = "elementwise"

    def combine(self, J: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The combined gradient.

        Args:
            J: the task gradients ``[T, P]`` (one flattened gradient per row).
            ctx: the step's context (generator, losses, AMP scale, dtype).

        Returns:
            The update ``[P]``, in ``J``'s dtype.
        """
        raise NotImplementedError


class LossMethod(Method):
    """A method that reweights (or transforms) the task losses; the per-task terms it returns
    are summed (their gradients are what the optimizer combines, EW over the terms).

    Lifecycle: :meth:`setup` (``T`` and the device; methods with :attr:`has_parameters` need it
    at construction, ``MTLOptimizer(num_tasks=T)``) -> per step :meth:`terms` -> (methods with
    :attr:`weights_from_gram`) :meth:`weights` from the Gram of the terms' gradients, else the
    terms are summed -> (methods with :attr:`needs_closure`) :meth:`after_step` with the losses
    the closure re-evaluated -> per epoch :meth:`end_epoch`.
    """

    kind = "loss"
    has_parameters: ClassVar[bool] = False
    needs_closure: ClassVar[bool] = False
    weights_from_gram: ClassVar[bool] = False

    def setup(self, T: int, device: torch.device) -> None:
        """Allocate the per-task state for ``T`` tasks on ``device``.

        Args:
            T: the number of tasks.
            device: the device of the state (the losses' device).
        """
        self.T, self.device = T, device

    def parameters(self) -> list[torch.nn.Parameter]:
        """Parameters trained by the model's optimizer (UW's log-variances)."""
        return []

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor, ctx: StepContext
              ) -> list[torch.Tensor]:
        """The T per-task terms. ``losses`` carry the graph (scaled by AMP's ``ctx.scale`` when
        it is set: a term added to a loss must be multiplied by it); ``values`` are the detached,
        unscaled losses ``[T]`` (averaged over the processes).

        Args:
            losses: the ``T`` task losses (0-dim tensors with their graph).
            values: their detached, unscaled values ``[T]``.
            ctx: the step's context (generator, AMP scale, dtype).

        Returns:
            The ``T`` terms (0-dim tensors with their graph), summed for the backward.
        """
        raise NotImplementedError

    def weights(self, G: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, Any]:
        """Methods with :attr:`weights_from_gram` (a loss transform followed by a gradient
        weighting, e.g. IMTL's loss and gradient balance): ``(w, status)`` from the Gram of the
        terms' gradients, as :meth:`GramMethod.weights`.

        Args:
            G: the Gram of the terms' gradients ``[T, T]``.
            ctx: the step's context.

        Returns:
            ``(w, status)`` as :meth:`GramMethod.weights`.
        """
        raise NotImplementedError

    def after_step(self, new_values: torch.Tensor) -> None:
        """The losses of the same batch after the step (methods with :attr:`needs_closure`).

        Args:
            new_values: the detached, unscaled losses ``[T]`` the closure re-evaluated.
        """

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        """Per-epoch update (DWA, STCH, GradNorm...); a no-op by default.

        Args:
            mean_losses: the epoch's mean training losses ``[T]``.
        """

    def loss_weights(self) -> torch.Tensor | None:
        """The current loss weights for logging (None when the method has none)."""
        return None


class TrainerMode(Method):
    """A mode of the bundled trainer (``gradops train --method NAME``), not an optimizer
    method."""

    kind = "trainer"


# --- the registry -----------------------------------------------------------------------------
_REGISTRY: dict[str, type[Method]] = {}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry (its declaration is checked).

    Args:
        cls: a subclass of one of the kinds' bases (:class:`GramMethod`...).

    Returns:
        ``cls`` itself.

    Raises:
        TypeError: for a class that is not a Method of one of :data:`KINDS`, or whose
            ``Options`` is not an :class:`Options` dataclass.
        ValueError: for a bad or empty ``name``, an empty ``display`` or ``paper``, or a name
            another class registered.
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.kind not in KINDS:
        raise TypeError(f"register: {cls!r} is not a Method subclass of one of the kinds {KINDS}")
    name = cls.name
    if not name or name != name.lower() or "_" in name or " " in name:
        raise ValueError(f"register: {cls.__name__}.name must be lower case with '-' between "
                         f"words, got {name!r}")
    for attr in ("display", "paper"):
        if not getattr(cls, attr):
            raise ValueError(f"register: {cls.__name__}.{attr} is empty")
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, Options) and
            dataclasses.is_dataclass(cls.Options)):
        raise TypeError(f"register: {cls.__name__}.Options must be an Options dataclass")
    k = _key(name)
    old = _REGISTRY.get(k)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                  cls.__qualname__):
        raise ValueError(f"register: {name!r} is already registered by {old.__module__}."
                         f"{old.__qualname__}")
    cls.Options._method = name
    _REGISTRY[k] = cls
    return cls


def all_methods(kind: str | tuple[str, ...] | None = None) -> tuple[type[Method], ...]:
    """The registered method classes (of ``kind``), in listing order: by kind, then ``order``,
    then name.

    Args:
        kind: one of :data:`KINDS`, a tuple of them, or None for every kind.

    Returns:
        The classes, as a tuple.

    Raises:
        ValueError: for an unknown kind.
    """
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None:
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown method kind(s) {bad}; valid: {', '.join(KINDS)}")
    out = [c for c in _REGISTRY.values() if kinds is None or c.kind in kinds]
    return tuple(sorted(out, key=lambda c: (KINDS.index(c.kind), c.order, c.name)))


def method_names(kind: str | tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The registered names (of ``kind``), in listing order.

    Args:
        kind: one of :data:`KINDS`, a tuple of them, or None for every kind.

    Returns:
        The names, as a tuple.

    Raises:
        ValueError: for an unknown kind.
    """
    return tuple(c.name for c in all_methods(kind))


def get_method(name: str, who: str = "gradops.weighting") -> type[Method]:
    """The method class called ``name`` (case, ``-`` and ``_`` ignored).

    Args:
        name: the method's name (``"IMTL-G"``, ``"nash_mtl"``...).
        who: the caller's name, which starts the error messages.

    Returns:
        The registered class.

    Raises:
        TypeError: when ``name`` is not a str.
        ValueError: for an unknown name (the message lists the valid ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"{who}: a method name must be a str, got {type(name).__name__}")
    cls = _REGISTRY.get(_key(name))
    if cls is None:
        raise ValueError(f"{who}: unknown method {name!r}; valid: {', '.join(method_names())}")
    return cls


def canonical_name(name: str, who: str = "gradops.weighting") -> str:
    """The registered spelling of ``name`` (``"PCGrad_Layer"`` -> ``"pcgrad-layer"``).

    Args:
        name: a method's name in any case, with ``-`` or ``_`` or neither.
        who: the caller's name, which starts the error messages.

    Returns:
        The name as registered.

    Raises:
        TypeError: when ``name`` is not a str.
        ValueError: for an unknown name.
    """
    return get_method(name, who).name


def create_method(method: str | Method, options: dict[str, Any] | Options | None = None,
                  who: str = "gradops.weighting") -> Method:
    """A method object from a name and its options (a dict or the method's Options), or the
    given object itself (then ``options`` must be empty).

    Args:
        method: a method's name, or a method object.
        options: the options, as a dict by name or as the method's :class:`Options`; None or
            empty for the defaults.
        who: the caller's name, which starts the error messages.

    Returns:
        The method object.

    Raises:
        TypeError: for an unknown option (the message names it).
        ValueError: for an unknown name, an option value of the wrong type or out of its range,
            or options given with an object.
    """
    if isinstance(method, Method):
        if options:
            raise ValueError(f"{who}: options given with a method object; set them on the "
                             "object instead")
        return method
    cls = get_method(method, who)
    if isinstance(options, Options):
        return cls(options)
    try:
        return cls(**dict(options or {}))
    except (TypeError, ValueError) as e:
        raise type(e)(f"{who}: {e}") from None
