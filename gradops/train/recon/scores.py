"""Recon's per-layer S-conflict scores and cosine distributions, accumulated on the device.

Recon (Shi et al., ICLR 2023, Def. 3 and Algorithm 1): the S-conflict score of a shared layer in
one iteration is the number of task pairs ``i < j`` whose gradients with respect to that layer
have cosine ``< S``; summed over the iterations of a short training run it ranks the layers.
Here the per-layer Grams come from one pass over the per-task gradients
(:func:`gradops.segment_gram`, as :class:`gradops.optim.MTLOptimizer` computes them with
``stats=True``, one Gram per parameter tensor); a layer's Gram is the sum of its parameters'
Grams. Nothing here synchronises with the device until a result is read.

:func:`pair_loop_scores` is the published approach (a Python loop over layers and task pairs,
one cosine and one host sync per pair), kept for the side-by-side cost measurement
(:func:`bench_search_cost`).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ... import metrics
from ...ops.gram import segment_gram
from ...segments import offsets_from_numels
from ..engine.stats import LayerScores

__all__ = ["LayerScores", "CosineBins", "TABLE6_BINS", "pair_loop_scores", "fused_scores",
           "bench_search_cost"]

# Recon's Table 6 bins of cos(phi_ij), as (label, low, high): low <= cos < high, except the
# first (cos > 0) and the second (which holds cos == 0)
TABLE6_BINS = (("(0, 1]", 0.0, None), ("[-0.01, 0]", -0.01, 0.0),
               ("[-0.02, -0.01)", -0.02, -0.01), ("[-0.03, -0.02)", -0.03, -0.02),
               ("[-1, -0.03)", None, -0.03))


class CosineBins:
    """Distribution of pairwise cosines in Recon's Table 6 bins (:data:`TABLE6_BINS`), counted
    on device from Grams ``[T, T]`` (one per step)."""

    def __init__(self, T: int, device: torch.device | str = "cpu"):
        self.T = T
        i = torch.arange(T, device=device)
        self._upper = i.unsqueeze(1) < i.unsqueeze(0)
        self.counts = torch.zeros(len(TABLE6_BINS), dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, G: torch.Tensor) -> None:
        cos = metrics.cosine(G.detach())[self._upper.to(G.device)]
        finite = torch.isfinite(cos)
        self.nonfinite += (~finite).sum()
        c = cos[finite]
        masks = []
        for _, lo, hi in TABLE6_BINS:
            if hi is None:
                masks.append(c > lo)
            elif lo is None:
                masks.append(c < hi)
            elif hi == 0.0:
                masks.append((c >= lo) & (c <= hi))
            else:
                masks.append((c >= lo) & (c < hi))
        self.counts += torch.stack([m.sum() for m in masks])

    def percentages(self) -> dict[str, float]:
        """Per bin, the percentage of all counted finite pairs (one host read)."""
        counts = self.counts.tolist()
        total = sum(counts)
        return {label: (100.0 * c / total if total else float("nan"))
                for (label, _, _), c in zip(TABLE6_BINS, counts)}


def fused_scores(J: torch.Tensor, offsets: torch.Tensor, S: float) -> torch.Tensor:
    """One iteration's S-conflict counts per segment of ``J`` ``[T, P]`` (one pass, on device)."""
    return metrics.conflict_counts(segment_gram(J, offsets), S)


def pair_loop_scores(J: torch.Tensor, offsets: torch.Tensor, S: float) -> list[int]:
    """The published approach: per layer, per task pair, a cosine and a host sync (``.item()``).
    Counts as :func:`fused_scores`, except that zero-norm gradients follow
    ``torch.nn.functional.cosine_similarity`` (its ``eps``) instead of cosine 0."""
    T = J.shape[0]
    o = offsets.tolist()
    counts = [0] * (len(o) - 1)
    for layer in range(len(o) - 1):
        a, b = o[layer], o[layer + 1]
        for i in range(T):
            for j in range(i + 1, T):
                cos = F.cosine_similarity(J[i, a:b], J[j, a:b], dim=0)
                if cos.item() < S:
                    counts[layer] += 1
    return counts


def _time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_search_cost(numels: Sequence[int], T: int, S: float = -0.02, repeats: int = 5,
                      device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Seconds per iteration of the S-conflict scoring of one step, fused (per-layer Grams in
    one pass, counts on device) and the pair loop, on random per-task gradients ``[T, P]``
    with one segment per layer of ``numels`` (best of ``repeats``). The two count the same
    (checked here, raising ``RuntimeError`` otherwise)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    P = int(sum(numels))
    J = torch.randn(T, P, generator=g).to(device)
    offsets = offsets_from_numels(list(numels))
    sync = (torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None))
    acc = torch.zeros(len(numels), dtype=torch.int64, device=device)

    def fused():
        acc.add_(fused_scores(J, offsets, S))

    a = fused_scores(J, offsets, S).tolist()
    b = pair_loop_scores(J, offsets, S)
    if a != b:
        raise RuntimeError(f"bench_search_cost: fused {a} != pair loop {b}")
    t_fused = _time(fused, repeats, sync)
    t_loop = _time(lambda: pair_loop_scores(J, offsets, S), repeats, sync)
    return {"T": T, "layers": len(numels), "P": P, "device": str(device),
            "fused_s": t_fused, "pair_loop_s": t_loop,
            "speedup": t_loop / t_fused if t_fused > 0 else float("inf"),
            "host_syncs_pair_loop": len(numels) * T * (T - 1) // 2, "host_syncs_fused": 0}
