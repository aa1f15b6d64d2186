"""Per-epoch conflict statistics, accumulated on the device and read once per epoch.

From each step's Gram ``G`` of the per-task gradients on the shared parameters (masked ones
under sparse training) and its per-parameter Grams (``MTLOptimizer(stats=True)``'s ``info``):
the incidence of gradient conflict (fraction of task pairs with cosine < 0), the mean pairwise
cosine, the mean pairwise gradient magnitude similarity (GMS), the per-layer S-conflict counts
(S = 0; a *layer* is a module owning parameters directly, weight and bias together: its Gram is
the sum of its parameters' Grams) and a 40-bin histogram of the pairwise cosines on ``[-1, 1]``.
Nothing here synchronises with the device until :meth:`ConflictStats.read`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ... import metrics

__all__ = ["ConflictStats", "LayerScores", "layer_index", "HIST_BINS"]

HIST_BINS = 40


def layer_index(module: nn.Module, shared: list[torch.Tensor]) -> tuple[list[str], list[int]]:
    """Layer names (``module``'s sub-module names owning parameters) and, per shared parameter,
    the index of its layer."""
    owner: dict[int, str] = {}
    for name, sub in module.named_modules():
        for p in sub.parameters(recurse=False):
            owner.setdefault(id(p), name or "(root)")
    names: list[str] = []
    index: list[int] = []
    for p in shared:
        n = owner.get(id(p), "(other)")
        if n not in names:
            names.append(n)
        index.append(names.index(n))
    return names, index


class LayerScores:
    """Summed S-conflict counts per layer from per-parameter Grams ``[n_params, T, T]``.

    Args:
        param_layer: per parameter tensor (in the Grams' order), the index of its layer.
        n_layers: the number of layers.
        S: the severity threshold, ``-1 < S <= 0`` (Recon, Shi et al., ICLR 2023, Def. 3).
        device: where the counters live.
    """

    def __init__(self, param_layer: Sequence[int], n_layers: int, S: float,
                 device: torch.device | str = "cpu"):
        if not -1.0 < float(S) <= 0.0:
            raise ValueError(f"LayerScores: S must be in (-1, 0], got {S}")
        self.S = float(S)
        self.n_layers = int(n_layers)
        self._index = torch.as_tensor(list(param_layer), dtype=torch.long, device=device)
        if len(self._index) and int(self._index.max()) >= n_layers:
            raise ValueError("LayerScores: param_layer holds an index >= n_layers")
        self.counts = torch.zeros(self.n_layers, dtype=torch.int64, device=device)
        self.steps = 0

    def layer_grams(self, param_grams: torch.Tensor) -> torch.Tensor:
        """``[L, T, T]``: each layer's Gram, the sum of its parameters' Grams (on device)."""
        if param_grams.shape[0] != len(self._index):
            raise ValueError(f"LayerScores: got {param_grams.shape[0]} parameter Grams for "
                             f"{len(self._index)} parameters")
        T = param_grams.shape[-1]
        out = torch.zeros(self.n_layers, T, T, dtype=param_grams.dtype,
                          device=param_grams.device)
        return out.index_add_(0, self._index.to(param_grams.device), param_grams)

    def add(self, param_grams: torch.Tensor) -> torch.Tensor:
        """Count one iteration; returns its layer Grams."""
        Gl = self.layer_grams(param_grams.detach())
        self.counts += metrics.conflict_counts(Gl, self.S)
        self.steps += 1
        return Gl


class ConflictStats:
    """Accumulates one epoch's statistics from MTLOptimizer step infos (device tensors)."""

    def __init__(self, T: int, device: torch.device, layers: list[str], param_layer: list[int]):
        self.T, self.device = T, device
        self.layers = layers
        self._param_layer = list(param_layer)
        self._rows, self._cols = torch.triu_indices(T, T, 1, device=device)
        self.reset()

    def reset(self) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=self.device)  # noqa: E731
        self._gc, self._cos, self._gms = z(()), z(()), z(())
        self._layer = LayerScores(self._param_layer, len(self.layers), 0.0, self.device)
        self._hist = torch.zeros(HIST_BINS + 1, dtype=torch.int64, device=self.device)
        self.steps = 0            # steps that had per-task gradients (host count, no sync)

    def add(self, info: Any) -> None:
        G = getattr(info, "gram", None)
        if G is None or self.T < 2:
            return
        G = G.detach().float()
        r, c = self._rows, self._cols
        cos = metrics.cosine(G)[r, c]
        self._gc += metrics.conflict_incidence(G).double()
        self._cos += cos.double().mean()
        self._gms += metrics.gms(G)[r, c].double().mean()
        bins = ((cos + 1) * (HIST_BINS / 2)).floor().clamp(0, HIST_BINS - 1)
        bins = torch.where(torch.isfinite(cos), bins, torch.full_like(bins, HIST_BINS)).long()
        self._hist.index_add_(0, bins, torch.ones_like(bins))
        Gl = getattr(info, "layer_gram", None)
        if Gl is not None and len(self.layers):
            self._layer.add(Gl)
        self.steps += 1

    def read(self) -> dict[str, Any] | None:
        """The epoch's statistics (one transfer), or None when no step had per-task gradients."""
        if self.steps == 0:
            return None
        vals = torch.cat([torch.stack([self._gc, self._cos, self._gms]).cpu(),
                          self._layer.counts.cpu().double(), self._hist.cpu().double()]).tolist()
        n = self.steps
        L = len(self.layers)
        return {"incidence": vals[0] / n, "mean_cos": vals[1] / n, "gms": vals[2] / n,
                "layers": ({name: int(v) for name, v in zip(self.layers, vals[3:3 + L])}
                           if self._layer.steps else None),
                "hist": [int(v) for v in vals[3 + L:3 + L + HIST_BINS]],
                "nonfinite": int(vals[-1])}
