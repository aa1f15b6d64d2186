"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017), as TorchJD's ``Krum``."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import SolverStatus, _poison, _prep, _ret
from ._registry import GramMethod, Options, StepContext, register

__all__ = ["Krum", "KrumOptions", "krum"]


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"gradops.weighting.krum: {name} must be a Python int >= {low}, "
                         f"got {value!r}")


def krum(G: torch.Tensor, n_byzantine: int = 0, n_selected: int = 1, squared: bool = False, *,
         return_status: bool = False):
    """Krum / Multi-Krum (Blanchard et al., NeurIPS 2017, Sec. 4, the Krum choice function and
    its Multi-Krum variant; TorchJD's ``Krum(n_byzantine, n_selected)``): with ``f`` =
    ``n_byzantine``, each task's score is the sum of its distances to its ``T - f - 2`` nearest
    other tasks, ``s(i) = sum_{j in N_i} ||g_i - g_j||``, and the ``m = n_selected`` tasks of
    smallest score are averaged: ``w_i = 1/m`` for them, 0 for the others. Distances come from
    ``G``: ``||g_i - g_j||^2 = G_ii + G_jj - 2 G_ij`` (float64, clamped at 0).

    ``squared=False`` (default) sums distances, as TorchJD does; ``squared=True`` sums squared
    distances, the paper's score. Ties at the selection boundary (equal scores) share the
    remaining weight equally, so the weights are permutation-equivariant; without ties this is
    exactly TorchJD's (``topk``) selection.

    Krum needs ``T >= f + 3`` (TorchJD raises below; the paper assumes ``T > 2f + 2``). For a
    smaller ``T`` the score has ``max(T - f - 2, 0)`` terms (with none, every task ties and the
    weights are the mean) and the status says ``converged = False``, so
    :meth:`MTLOptimizer.stats` counts and warns. ``n_selected > T`` is an error.

    Scale convention: TorchJD's: the weights sum to 1, ``d`` is the mean of the selected
    gradients (one gradient for Krum), the mean scale, not EW's sum; LibMTL has no Krum. Weights
    are invariant to ``J -> sJ``; ``d`` scales by ``s``. NaN/Inf in ``G`` give NaN weights.

    State: none. Cost beyond the ``T`` backward passes: the Gram and a ``T x T`` sort.
    """
    G = _prep(G, "krum")
    _check_int("n_byzantine", n_byzantine, 0)
    _check_int("n_selected", n_selected, 1)
    T = G.shape[0]
    if n_selected > T:
        raise ValueError(f"gradops.weighting.krum: n_selected = {n_selected} exceeds the "
                         f"number of tasks T = {T}")
    dt, dev = G.dtype, G.device
    Gd = G.to(torch.float64)
    diag = Gd.diagonal()
    D = torch.clamp(diag[:, None] + diag[None, :] - 2.0 * Gd, min=0.0)
    if not squared:
        D = torch.sqrt(D)
    k = max(T - n_byzantine - 2, 0)
    scores = torch.sort(D, dim=1).values[:, 1:1 + k].sum(1)   # column 0: the task itself (0)
    cut = torch.sort(scores).values[n_selected - 1]
    below = (scores < cut).to(torch.float64)
    at = (scores == cut).to(torch.float64)
    m = float(n_selected)
    w = below / m + at * (m - below.sum()) / (m * at.sum())
    w = (w + _poison(Gd)).to(dt)
    valid = torch.full((), T >= n_byzantine + 3, dtype=torch.bool, device=dev)   # a fill: no copy
    ok = torch.isfinite(w).all() & valid
    status = SolverStatus(ok, torch.zeros((), dtype=torch.int64, device=dev),
                          torch.where(ok, torch.zeros((), dtype=dt, device=dev),
                                      torch.full((), math.nan, dtype=dt, device=dev)))
    return _ret(w, status, return_status)


@dataclass(frozen=True)
class KrumOptions(Options):
    n_byzantine: int = 0            # f: the number of tasks that may be adversarial
    n_selected: int = 1             # m: 1 is Krum, > 1 Multi-Krum
    squared: bool = False           # sum squared distances (the paper) instead of distances

    def check(self) -> None:
        if self.n_byzantine < 0:
            self.fail("n_byzantine", f"must be >= 0, got {self.n_byzantine}")
        if self.n_selected < 1:
            self.fail("n_selected", f"must be >= 1, got {self.n_selected}")


@register
class Krum(GramMethod):
    """Byzantine-robust selection of the most central task gradient(s) (:func:`krum`)."""

    name = "krum"
    display = "Krum"
    paper = ("Blanchard et al., Machine Learning with Adversaries: Byzantine Tolerant Gradient "
             "Descent, NeurIPS 2017")
    Options = KrumOptions

    def weights(self, G: torch.Tensor, ctx: StepContext):
        return krum(G, **self.options.as_dict(), return_status=True)

    def torchjd(self, T: int):
        if self.options.squared:
            return None                 # TorchJD sums plain distances
        from torchjd.aggregation import Krum as TorchJDKrum
        return TorchJDKrum(n_byzantine=self.options.n_byzantine,
                           n_selected=self.options.n_selected)
