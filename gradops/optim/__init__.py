"""Optimizers and optimizer wrappers: the multi-task wrapper (:class:`MTLOptimizer`, SPEC §0-4)
and sparse training (SPEC §5)."""
from .sparse_adamw import SparseAdamW, sparse_adamw_update
from .sparse_training import SparseTraining
from .mtl import MTLOptimizer, MTLStepInfo

__all__ = ["MTLOptimizer", "MTLStepInfo", "SparseAdamW", "SparseTraining", "sparse_adamw_update"]
