"""Data sets of the trainer (``--data``): the embedded ``digits`` and ``digits-attrs`` (built from
scikit-learn's handwritten digits, cached on disk) and a registry for more.
"""
from __future__ import annotations

from .cache import cache_dir
from .digits import build_digits, build_digits_attrs
from .registry import (MTLData, Split, check_dataset, dataset_names, load_dataset,
                       register_dataset)

__all__ = ["MTLData", "Split", "cache_dir", "check_dataset", "dataset_names", "load_dataset",
           "register_dataset"]

register_dataset("digits", build_digits,
                 description="two-digit composites of sklearn's digits: left, right, sum")
register_dataset("digits-attrs", build_digits_attrs,
                 description="the same composites with 16 binary attribute tasks")
