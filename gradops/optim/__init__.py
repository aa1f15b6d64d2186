"""Optimizers and optimizer wrappers: the multi-task wrapper (:class:`MTLOptimizer`,
docs/methods.md#mtloptimizer-data-path)
and sparse training (docs/methods.md#sparse-training)."""
from .sparse_adamw import SparseAdamW, sparse_adamw_update
from .sparse_training import SparseTraining
from .mtl import MTLOptimizer, MTLStepInfo

__all__ = ["MTLOptimizer", "MTLStepInfo", "SparseAdamW", "SparseTraining", "sparse_adamw_update"]
