"""What :class:`gradops.optim.MTLOptimizer`'s ``method`` argument becomes: a method object of the
registry (:mod:`gradops.weighting._registry`), built from a name and its options, given as an
object, or wrapped around a user callable ``f(G) -> w`` (a TorchJD ``Weighting`` is such a
callable)."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from ..weighting import GramMethod, Method, Options, StepContext, canonical_name, create_method

__all__ = ["CallableWeighting", "resolve_method"]

_WHO = "MTLOptimizer"


class CallableWeighting(GramMethod):
    """A user callable ``f(G [T, T]) -> w [T]`` as a Gram-weighted method (not registered;
    assumed not scale-invariant, so under AMP it sees the unscaled Gram)."""

    name = "callable"
    display = "callable"
    paper = "a user function of the Gram"
    scale_invariant = False

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn
        self.label = getattr(fn, "__name__", type(fn).__name__)

    def __repr__(self) -> str:
        return f"CallableWeighting({self.label})"

    def weights(self, G: torch.Tensor, ctx: StepContext):
        w = self.fn(G)
        T = G.shape[-1]
        if not isinstance(w, torch.Tensor) or w.shape != (T,):
            raise ValueError(f"MTLOptimizer: method {self.label!r} returned "
                             f"{getattr(w, 'shape', type(w).__name__)}, expected weights [T]")
        return w, None


def resolve_method(method: str | Method | Callable, per_layer: bool,
                   method_options: dict[str, Any] | Options | None,
                   legacy_options: dict[str, Any]) -> Method:
    """The method object of ``method``: a registered name with ``method_options`` (a dict or the
    method's Options), a method object, or a callable ``G -> w``. ``per_layer=True`` with
    ``"pcgrad"`` is the deprecated spelling of ``"pcgrad-layer"``; ``legacy_options`` are the
    deprecated ``**options`` keywords."""
    if legacy_options:
        if method_options:
            raise TypeError(f"{_WHO}: pass the method's options as method_options= (not also as "
                            f"keywords {sorted(legacy_options)})")
        warnings.warn(f"MTLOptimizer: method options as keywords ({sorted(legacy_options)}) are "
                      "deprecated; pass method_options={...} or a method object, e.g. "
                      "gradops.weighting.CAGrad(c=0.4)", DeprecationWarning, stacklevel=3)
        method_options = dict(legacy_options)
    if isinstance(method, Method):
        if per_layer:
            raise ValueError(f"{_WHO}: per_layer=True is not supported with a method object; "
                             "use the per-layer method (e.g. 'pcgrad-layer')")
        return create_method(method, method_options, _WHO)
    if callable(method) and not isinstance(method, str):
        if per_layer:
            raise ValueError(f"{_WHO}: per_layer=True is not supported for a callable method")
        if method_options:
            raise ValueError(f"{_WHO}: options {sorted(dict(method_options))} given with a "
                             "callable method; bind them into the callable instead")
        return CallableWeighting(method)
    if not isinstance(method, str):
        raise TypeError(f"{_WHO}: method must be a name, a method object or a callable G -> w, "
                        f"got {type(method).__name__}")
    if per_layer:
        if canonical_name(method, _WHO) != "pcgrad":
            raise ValueError(f"{_WHO}: per_layer=True is available for 'pcgrad' (the method "
                             f"'pcgrad-layer'), not {method!r}")
        warnings.warn("MTLOptimizer: per_layer=True is deprecated; use method='pcgrad-layer'",
                      DeprecationWarning, stacklevel=3)
        method = "pcgrad-layer"
    m = create_method(method, method_options, _WHO)
    if m.kind == "trainer":
        raise ValueError(f"{_WHO}: {m.name!r} is a mode of the bundled trainer (gradops train "
                         "--method), not an optimizer method")
    return m
