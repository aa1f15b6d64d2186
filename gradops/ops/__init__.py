"""Fused operators, one file per op (kernels, launcher, CPU path and registration together)."""
from .combine import combine
from .graddrop import graddrop
from .gram import GramWithSignCounts, gram, segment_gram
from .linear_gram import linear_combine, linear_gram
from .pcgrad import pcgrad, pcgrad_weights, random_orders
from .topk_mask import topk_indices, topk_mask

__all__ = ["GramWithSignCounts", "combine", "graddrop", "gram", "linear_combine", "linear_gram",
           "pcgrad", "pcgrad_weights", "random_orders", "segment_gram", "topk_indices",
           "topk_mask"]
