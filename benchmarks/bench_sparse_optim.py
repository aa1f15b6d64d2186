"""pytest-benchmark suite: SparseAdamW step time and state bytes against dense AdamW at 30%
selection (not part of the test run).

    .venv/bin/python -m pytest benchmarks/bench_sparse_optim.py --benchmark-only \
        --benchmark-columns=median,iqr,rounds

One optimizer step over ViT-B/16's encoder (timm's ``vit_base_patch16_224``, ``num_classes=0``,
random init; a stand-in with the same parameter shapes without timm), PSN masks with
``fraction=0.3``, fixed random gradients: dense AdamW (torch's default and ``fused=True``),
AdamW inside ``SparseTraining`` (dense state + restore of the frozen entries) and
``gradops.optim.SparseAdamW``. Each row's ``extra_info`` carries the state bytes.
``GRADOPS_BENCH_FRACTION`` sets the fraction, ``GRADOPS_BENCH_DEVICE=cuda`` runs on a GPU. For a
single table with ratios, use ``gradops bench --suite sparse``.
"""
from __future__ import annotations

import os

import pytest
import torch

from gradops.bench import sparse as peers
from gradops.bench.models import vit_b16_encoder
from gradops.sparse import psn_masks

FRACTION = float(os.environ.get("GRADOPS_BENCH_FRACTION", 0.3))
DEVICE = torch.device(os.environ.get("GRADOPS_BENCH_DEVICE", "cpu"))
IMPLS = [peers.SPARSE_DENSE, "AdamW (torch fused=True)",
         "SparseTraining(AdamW): dense AdamW + restore", "gradops SparseAdamW"]


@pytest.fixture(scope="module")
def setup():
    encoder, source = vit_b16_encoder(DEVICE)
    masks = psn_masks(encoder, fraction=FRACTION)
    return encoder, masks, source


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_optimizer_step(benchmark, setup, impl):
    encoder, masks, source = setup
    opt, extra = peers.sparse_optim_contenders(encoder, masks, only=[impl])[impl]

    def call():
        opt.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=10, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(
        model=source, trainable_fraction=masks.fraction, k=masks.k,
        state_bytes=sum(t.numel() * t.element_size() for s in opt.state.values()
                        for t in s.values() if isinstance(t, torch.Tensor)),
        extra_bytes=extra())
