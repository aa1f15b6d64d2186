"""Optimizers and optimizer wrappers: the multi-task wrapper (:class:`MTLOptimizer`,
docs/optim.md; its distributed options grouped as :class:`Distributed`) and sparse training
(:class:`SparseTraining`, docs/methods.md#sparse-training)."""
from .sparse_adamw import SparseAdamW, sparse_adamw_update
from .sparse_training import SparseTraining
from ._distributed import Distributed
from .mtl import MTLOptimizer, MTLStepInfo

__all__ = ["Distributed", "MTLOptimizer", "MTLStepInfo", "SparseAdamW", "SparseTraining",
           "sparse_adamw_update"]
