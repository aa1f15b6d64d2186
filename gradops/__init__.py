"""gradops: fused kernels for multi-task learning gradient methods.

Quick start::

    import torch, gradops
    J = torch.randn(8, 1_000_000)                 # [T, P]: one flattened gradient per task
    G = gradops.gram(J)                           # [T, T] = J J^T, one pass over J
    offsets = torch.tensor([0, 400_000, 1_000_000])
    Gl = gradops.segment_gram(J, offsets)         # [2, T, T] per-segment (per-layer) Grams
    gradops.metrics.conflict_incidence(G)         # fraction of task pairs with cos < 0
    g = gradops.pcgrad(J)                         # PCGrad: Gram pass, T x T solve, combine pass
    g = gradops.graddrop(J)                       # GradDrop: one fused pass
    g = gradops.combine(J, torch.ones(8))         # w^T J, optionally out= a .grad buffer

``gradops.info()`` says which backend (Triton, CUDA C++, CPU C++, torch) serves each op.
"""
from __future__ import annotations

from . import metrics, reference
from ._backend import BACKENDS, format_info, info, use_backend
from .ops import (GramWithSignCounts, combine, graddrop, gram, linear_combine, linear_gram,
                  pcgrad, pcgrad_weights, random_orders, segment_gram, topk_indices, topk_mask)
from .segments import offsets_from_numels
from . import optim, sparse, weighting

__version__ = "0.1.0.dev0"

__all__ = ["BACKENDS", "GramWithSignCounts", "__version__", "combine", "format_info", "graddrop",
           "gram", "info", "linear_combine", "linear_gram", "metrics", "offsets_from_numels",
           "optim", "pcgrad", "pcgrad_weights", "random_orders", "reference", "segment_gram",
           "sparse", "topk_indices", "topk_mask", "use_backend", "weighting"]
