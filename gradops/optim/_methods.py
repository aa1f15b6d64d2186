"""The gradient methods :class:`gradops.optim.MTLOptimizer` runs, resolved from a name or a
callable into one small spec: what the method needs (per-task gradients? per-layer Grams?) and
how it turns them into the combined gradient.

Kinds:

- ``"sum"``: EW / Joint Train, ``w = 1`` (or ``1/T``): one backward of the summed loss, unless
  statistics are asked for.
- ``"gram"``: weights ``[T]`` from the Gram (``gradops.weighting``: MGDA, CAGrad, IMTL-G,
  Nash-MTL, Aligned-MTL, PCGrad), or from a user callable ``f(G) -> w`` (a TorchJD
  ``Weighting`` is such a callable), then ``combine``.
- ``"layer"``: weights ``[L, T]`` from the per-layer Grams (per-layer PCGrad, GradVac), then a
  segmented ``combine``.
- ``"graddrop"``: GradDrop's fused pass over ``J``.

GradVac's Gram-form recurrence is :func:`gradops.weighting.gradvac_weights` (its state, the EMA
targets, lives in the optimizer).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable


from .. import weighting

__all__ = ["MethodSpec", "resolve_method", "METHOD_NAMES"]

# weightings whose weights do not change when every task gradient is scaled by the same s > 0,
# so that GradScaler's scaled gradients give the scaled update (the others get the unscaled Gram)
SCALE_INVARIANT = frozenset({"ew", "pcgrad", "graddrop", "cagrad", "imtlg", "alignedmtl",
                             "gradvac"})

METHOD_NAMES = ("ew", "pcgrad", "graddrop", "mgda", "cagrad", "imtlg", "nashmtl", "alignedmtl",
                "gradvac")


@dataclass
class MethodSpec:
    name: str
    kind: str                              # "sum" | "gram" | "layer" | "graddrop"
    fn: Callable[..., Any] | None = None   # Gram -> weights (kind "gram")
    options: dict[str, Any] = field(default_factory=dict)
    has_status: bool = False               # fn accepts return_status=True
    takes_losses: bool = False             # fn accepts losses= (MGDA's loss normalisation)
    random: bool = False                   # draws from the optimizer's generator


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def resolve_method(method: str | Callable, per_layer: bool, options: dict[str, Any]) -> MethodSpec:
    """The :class:`MethodSpec` of ``method`` with its keyword ``options`` validated."""
    if callable(method) and not isinstance(method, str):
        if per_layer:
            raise ValueError("MTLOptimizer: per_layer=True is not supported for a callable method")
        if options:
            raise ValueError(f"MTLOptimizer: options {sorted(options)} given with a callable "
                             "method; bind them into the callable instead")
        name = getattr(method, "__name__", type(method).__name__)
        return MethodSpec(name=name, kind="gram", fn=method)
    if not isinstance(method, str):
        raise TypeError(f"MTLOptimizer: method must be a name or a callable G -> w, got "
                        f"{type(method).__name__}")
    key = _key(method)
    if key not in METHOD_NAMES:
        raise ValueError(f"MTLOptimizer: unknown method {method!r}; valid: "
                         f"{', '.join(METHOD_NAMES)}, or a callable G [T, T] -> w [T]")
    if key == "gradvac" or (key == "pcgrad" and per_layer):
        allowed = {"beta", "eps"} if key == "gradvac" else {"reduction", "eps",
                                                             "libmtl_self_visit"}
        _check_options(key, options, allowed)
        opts = dict(options)
        if key == "gradvac":
            opts.setdefault("beta", 0.5)
            opts.setdefault("eps", 1e-8)
            if not 0.0 <= opts["beta"] <= 1.0:
                raise ValueError(f"MTLOptimizer: gradvac beta must be in [0, 1], got "
                                 f"{opts['beta']}")
        return MethodSpec(name=key, kind="layer", options=opts, random=True)
    if per_layer:
        raise ValueError(f"MTLOptimizer: per_layer=True is available for 'pcgrad' and 'gradvac' "
                         f"(always per layer), not {method!r}")
    if key == "graddrop":
        _check_options(key, options, {"leak", "eps"})
        return MethodSpec(name=key, kind="graddrop", options=dict(options), random=True)
    if key == "ew":
        _check_options(key, options, {"reduction"})
        red = options.get("reduction", "sum")
        if red not in ("sum", "mean"):
            raise ValueError(f"MTLOptimizer: ew reduction must be 'sum' or 'mean', got {red!r}")
        return MethodSpec(name=key, kind="sum", fn=weighting.ew, options=dict(options))
    fn = weighting.get(key)
    params = inspect.signature(fn).parameters
    allowed = {n for n in params if n not in ("G", "return_status", "losses", "generator",
                                              "perms")}
    _check_options(key, options, allowed)
    return MethodSpec(name=key, kind="gram", fn=fn, options=dict(options),
                      has_status="return_status" in params, takes_losses="losses" in params,
                      random=key == "pcgrad")


def _check_options(name: str, options: dict[str, Any], allowed: set[str]) -> None:
    bad = sorted(set(options) - allowed)
    if bad:
        raise TypeError(f"MTLOptimizer: method {name!r} takes no option(s) {bad}; its options: "
                        f"{sorted(allowed) or 'none'}")
