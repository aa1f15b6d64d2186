"""The float64 tolerances of the active-set solver of MGDA and CAGrad (Wolfe, "Finding the
nearest point in a polytope", Math. Programming 11, 1976), shared by its torch loop
(:func:`gradops.weighting._solvers._simplex_qp`) and its Triton program
(:func:`gradops.weighting._triton_solvers.simplex_qp_triton`); ``csrc/weighting_cpu.cpp`` holds
the same values (``kJitter``, ``kFloor``, ``kMargin``)."""
from __future__ import annotations

import torch

_JITTER = 4 * torch.finfo(torch.float64).eps
"""Added to the diagonal of the active-set solve (times ``T``), relative to ``max_i G_ii``."""
_FLOOR = 1e-12
"""The active-set iterate is frozen once its (scale-free) gap is below this (times ``1 + k``
for CAGrad), or below ``tol`` when that is smaller, or once no task improves it beyond
float64's rounding (``_MARGIN``)."""
_MARGIN = 1e-13
"""A task joins the corral only when its partial derivative is below the corral's by more than
this (times ``1 + t``): float64's rounding level on ``G / max_i G_ii``."""
