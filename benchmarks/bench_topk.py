"""pytest-benchmark suite for the per-neuron top-K masks (not part of the test run).

    .venv/bin/python -m pytest benchmarks/bench_topk.py --benchmark-only \
        --benchmark-columns=median,iqr,rounds

The masks of every Linear/Conv weight of ViT-B/16's encoder (timm's ``vit_base_patch16_224``,
random init, when timm is importable; else random tensors of the same 49 shapes), k = 300 (the
ST paper's setting): gradops vs a loop of ``torch.topk`` + scatter per weight vs a stable per-row
``torch.argsort`` per weight vs the paper's numpy ``argsort`` loop over rows, and the one-read
floor. ``GRADOPS_BENCH_K`` sets k; ``GRADOPS_BENCH_DEVICE=cuda`` runs on a GPU. For a single
table with ratios to the floor, use ``gradops bench --suite topk``.
"""
from __future__ import annotations

import os

import pytest
import torch

from gradops.bench import peers
from gradops.bench.models import vit_b16_weights
from gradops.bench.topk import topk_mask_all

K = int(os.environ.get("GRADOPS_BENCH_K", 300))
DEVICE = torch.device(os.environ.get("GRADOPS_BENCH_DEVICE", "cpu"))

IMPLS = {
    "one_read": lambda ws, k: [w.sum() for w in ws],
    "gradops.topk_mask": topk_mask_all,
    "torch.topk loop": peers.torch_topk_masks,
    "argsort per row": peers.argsort_masks,
    "numpy row loop (paper)": peers.numpy_row_loop_masks,
}


@pytest.fixture(scope="module")
def weights():
    return vit_b16_weights(DEVICE)[0]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_topk_masks_vit_b16(benchmark, weights, impl):
    fn = IMPLS[impl]

    def call():
        out = fn(weights, K)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    benchmark.extra_info["entries"] = sum(w.numel() for w in weights)
    benchmark.extra_info["k"] = K
    rounds = 3 if impl == "numpy row loop (paper)" else 10
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
