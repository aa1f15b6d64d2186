"""Fused operators, one file per op (kernels, launcher, CPU path and registration together)."""
from .gram import GramWithSignCounts, gram, segment_gram

__all__ = ["GramWithSignCounts", "gram", "segment_gram"]
