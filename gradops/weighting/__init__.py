"""Gram-weighted multi-task methods as plain functions ``G -> w`` (docs/methods.md).

Every function takes the Gram ``G = J J^T`` (``[T, T]``, any float dtype, any device) and returns
weights ``w`` (``[T]``, on ``G``'s device) such that the method's update is ``d = w^T J`` (the sum
convention: ``d = sum_i w_i g_i``, ``g_i`` the raw task gradients, row ``i`` of ``J``), to be
applied with :func:`gradops.combine`. The math runs in float32 (float64 when ``G`` is float64) and
the weights come back in that dtype.

No host synchronisation: there is no ``.item()``, no ``.cpu()`` and no Python branch on a tensor
value. Iterative solvers run a fixed number of iterations (``max_iter``, a Python int); their
tolerance only freezes the iterate on the device once it is reached (``torch.where``). Every
function traces under ``torch.compile(fullgraph=True)``.

``return_status=True`` returns ``(w, status)`` with a :class:`SolverStatus` of 0-dim device
tensors. An iterative solver that does not reach its tolerance within ``max_iter`` still returns
its best (last) iterate, and ``status.converged`` is False: nothing falls back silently; the caller
(``MTLOptimizer``) counts and warns. Closed forms report ``converged = all(isfinite(w))``.

Conventions (each function's docstring has the details):

    method      weights (d = w^T J)                         under J -> sJ
    ----------  ------------------------------------------  ---------------------------------
    ew          1 (sum) or 1/T (mean)                       w same, d -> s d
    mgda        min-norm point of the (normalised) hull     none: w same, d -> s d; l2: d same
    cagrad      (1/T + lam w*) / (1 + c^2)  (LibMTL scale)  w same, d -> s d
    imtlg       G^+ n / (1^T G^+ n), n_i = ||g_i||          w same, d -> s d
    nashmtl     G a = 1/a, then ||d|| <= max_norm (1.0)     a -> a / s, d same (before clip)
    alignedmtl  B 1, B = sqrt(l_min) V diag(l)^-1/2 V^T     w same, d -> s d
    pcgrad      gradops.pcgrad_weights (fp32; fp64 for fp64)  w same, d -> s d

All are permutation-equivariant (permuting the tasks permutes ``w``) wherever their solution is
unique; PCGrad with explicit ``perms`` transforms with the orders.

Iteration budgets: ``mgda``, ``cagrad`` and ``nashmtl`` run at most ``max_iter`` iterations, and a
converged iterate is frozen (``torch.where``), so the result never depends on how many iterations
are left. On a GPU (and under ``torch.compile``) the loop always runs the full budget: deciding to
stop would need a host read. On CPU tensors in eager mode, where reading a value costs nothing,
the loop stops as soon as it has converged (``early_exit=None``, the default; ``False`` forces the
full budget, ``True`` forces the check).

Solver backends (op ``weighting_solvers`` in :func:`gradops.info`): in eager mode the loops of
``mgda``, ``cagrad`` and ``nashmtl`` run in C++ on CPU tensors (``csrc/weighting_cpu.cpp``, when
the extension is built: the same algorithms step for step, in double precision) and in one Triton
program per solve on CUDA tensors with ``T <= 64`` (:mod:`gradops.weighting._triton_solvers`:
one launch instead of dozens per iteration; MGDA's and CAGrad's active-set solver runs in float64
in every backend, Nash-MTL's Newton loop in ``G``'s dtype on the GPU), on the ``T x T`` inputs
prepared here, stopping
on the device once converged (whatever ``early_exit`` says: the result is the same). The torch
loops below are the reference and serve ``torch.compile``, fake tensors, ``T > 64`` on CUDA and
a ``G`` that requires grad; ``gradops.use_backend("torch")`` (or ``GRADOPS_BACKEND=torch``)
forces them, ``use_backend("cpp")`` / ``use_backend("triton")`` force the others (an error
where they cannot run; Triton on CPU tensors needs ``TRITON_INTERPRET=1``).

Linear algebra on CUDA: ``imtlg`` and ``alignedmtl`` call ``torch.linalg.eigh``, and ``nashmtl``
``torch.linalg.cholesky_ex``; the ``_ex`` form never checks its ``info`` on the host, but PyTorch's
``eigh`` checks convergence and may synchronise with the device on CUDA (a ``T x T`` call).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from ._alignedmtl import ALIGNED_SCALE_MODES, AlignedMTL, alignedmtl
from ._cagrad import CAGrad, cagrad
from ._common import SolverStatus
from ._dwa import DWA
from ._ew import EW, ew
from ._famo import FAMO
from ._graddrop import GradDrop
from ._gradvac import GradVac, gradvac_weights
from ._imtlg import IMTLG, imtlg
from ._mgda import MGDA, MGDA_NORMALIZATIONS, mgda
from ._nashmtl import NashMTL, nashmtl
from ._pcgrad import PCGrad, pcgrad
from ._pcgrad_layer import PCGradLayer
from ._registry import (KINDS, ElementwiseMethod, GramMethod, LayerMethod, LossMethod, Method,
                        NoOptions, Options, StepContext, SumMethod, TrainerMode, all_methods,
                        canonical_name, create_method, get_method, method_names,
                        parse_option_value, register)
from ._uw import UW

__all__ = ["ALIGNED_SCALE_MODES", "ITERATIVE", "KINDS", "MGDA_NORMALIZATIONS", "METHODS",
           "SolverStatus", "alignedmtl", "cagrad", "ew", "get", "gradvac_weights", "imtlg",
           "mgda", "nashmtl", "pcgrad",
           # the method registry (docs/adding-a-method.md)
           "Method", "SumMethod", "GramMethod", "LayerMethod", "ElementwiseMethod", "LossMethod",
           "TrainerMode", "Options", "NoOptions", "StepContext", "register", "get_method",
           "create_method", "method_names", "all_methods", "canonical_name", "parse_option_value",
           "AlignedMTL", "CAGrad", "DWA", "EW", "FAMO", "GradDrop", "GradVac", "IMTLG", "MGDA",
           "NashMTL", "PCGrad", "PCGradLayer", "UW"]

METHODS: dict[str, Callable] = {
    "ew": ew,
    "mgda": mgda,
    "cagrad": cagrad,
    "imtlg": imtlg,
    "nashmtl": nashmtl,
    "alignedmtl": alignedmtl,
    "pcgrad": pcgrad,
}
"""Name -> weighting function of the Gram-weighted methods (plain functions, for direct calls).
Every function: ``f(G, ..., return_status=False)``. The registry (:func:`get_method`,
:func:`method_names`) lists every method of every kind."""


# every module of this package registers its methods (a new method is a new module): import the
# ones not imported above
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def __getattr__(name: str):
    """A registered method's class by its class name (``gradops.weighting.RLW``): a method
    added as a new module is reachable here without editing this file."""
    for cls in all_methods():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ITERATIVE = frozenset({"mgda", "cagrad", "nashmtl"})
"""The iterative methods with a plain function here whose solver loops also run in C++ and
Triton (op ``weighting_solvers``); every registered method says whether it is iterative
(``Method.iterative``)."""


def get(name: str) -> Callable:
    """The weighting function ``G -> w`` called ``name`` (case, ``-`` and ``_`` ignored:
    ``"IMTL-G"``, ``"nash_mtl"``, ``"Aligned-MTL"`` work); Gram-weighted methods with a plain
    function only (see :data:`METHODS`; :func:`get_method` for every registered method).

    Args:
        name: the method's name.

    Returns:
        The function, e.g. :func:`mgda`.

    Raises:
        ValueError: for an unknown method, or one without a plain function (the message lists
            the valid names).
    """
    key = canonical_name(name, "gradops.weighting.get") if isinstance(name, str) else name
    if key not in METHODS:
        raise ValueError(f"gradops.weighting.get: {name!r} has no weighting function G -> w; "
                         f"valid names: {', '.join(sorted(METHODS))}")
    return METHODS[key]
