"""Statistics of :class:`~gradops.optim.mtl.MTLOptimizer`: one step's (:class:`MTLStepInfo`, what
``backward`` returns) and, over the steps, running sums of the per-step values (device tensors,
no host sync per step) and solver-failure counts, read once in a while (an epoch) by
:meth:`StepStats.summary`, which synchronises."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .. import metrics

__all__ = ["MTLStepInfo", "StepStats", "mean_pairs"]


@dataclass
class MTLStepInfo:
    """What :meth:`MTLOptimizer.backward` returns; every field is a device tensor (or None).

    Attributes:
        weights: the combination weights, ``[T]`` (``[L, T]`` for per-layer methods; None for
            GradDrop).
        gram: ``G = J J^T`` ``[T, T]`` of this step's per-task gradients (None when the method
            needed no per-task gradients this step: EW without stats, ``update_every`` steps).
        conflict_incidence: fraction of task pairs with negative cosine (0-dim), or None.
        layer_gram: per-layer Grams ``[L, T, T]`` (``stats=True`` or per-layer methods).
        layer_conflicts: per-layer count of conflicting pairs (Recon's S-score with S = 0,
            ``[L]``), with ``stats=True``.
        layer_gms: per-layer mean over pairs of the gradient magnitude similarity ``[L]``, with
            ``stats=True``.
        converged: whether the solver converged (0-dim bool), for iterative solvers.
    """

    weights: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    conflict_incidence: torch.Tensor | None = None
    layer_gram: torch.Tensor | None = None
    layer_conflicts: torch.Tensor | None = None
    layer_gms: torch.Tensor | None = None
    converged: torch.Tensor | None = None


# the fields of MTLStepInfo that are averaged over the steps
_AVERAGED = ("weights", "conflict_incidence", "layer_conflicts", "layer_gms")


def mean_pairs(M: torch.Tensor) -> torch.Tensor:
    """Mean of a ``[..., T, T]`` pairwise statistic over the ``T (T - 1) / 2`` pairs ``s < t``
    (0 for ``T < 2``)."""
    T = M.shape[-1]
    if T < 2:
        return torch.zeros(M.shape[:-2], dtype=M.dtype, device=M.device)
    return (M * metrics._upper_pairs(T, M.device)).sum((-2, -1)) / (T * (T - 1) / 2)


class StepStats:
    """Running means of the step values and the solver-failure counts.

    A value whose shape changes between steps (e.g. ``[T]`` weights, then ``[L, T]``) restarts its
    mean from that step.
    """

    def __init__(self) -> None:
        self._acc: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._nonconverged_total: torch.Tensor | None = None

    def accumulate(self, info: Any) -> None:
        """Add one step's values (an :class:`MTLStepInfo`)."""
        self._steps += 1
        for key in _AVERAGED:
            v = getattr(info, key)
            if v is None:
                continue
            v = v.detach().to(torch.float32)
            if key in self._acc and self._acc[key].shape == v.shape:
                self._acc[key] = self._acc[key] + v
                self._acc[key + "_n"] = self._acc[key + "_n"] + 1
            else:
                self._acc[key] = v.clone()
                self._acc[key + "_n"] = torch.ones((), device=v.device)

    def count_failure(self, failed: torch.Tensor) -> None:
        """Count a solver failure (a 0-dim bool device tensor), without a host sync."""
        f = failed.to(torch.int64)
        self._nonconverged_total = f if self._nonconverged_total is None else \
            self._nonconverged_total + f
        self._acc["nonconverged"] = self._acc.get("nonconverged", torch.zeros_like(f)) + f

    def count_no_solution(self, none: torch.Tensor) -> None:
        """Count a step whose solver reported that no solution exists (a 0-dim bool device
        tensor: Nash-MTL's ``residual = inf`` at a Pareto-stationary point), without a host
        sync. Such a step is a failure too (:meth:`count_failure`)."""
        f = none.to(torch.int64)
        self._acc["no_solution"] = self._acc.get("no_solution", torch.zeros_like(f)) + f

    def summary(self, method: str, reset: bool = True) -> dict[str, Any]:
        """The means since the last reset, ``steps`` and ``nonconverged``; warns (naming
        ``method``) when a solver failed. Synchronises with the device."""
        out: dict[str, Any] = {"steps": self._steps}
        for key, v in self._acc.items():
            if key.endswith("_n") or key in ("nonconverged", "no_solution"):
                continue
            out[key] = v / self._acc[key + "_n"]
        failures = int(self._acc["nonconverged"].item()) if "nonconverged" in self._acc else 0
        out["nonconverged"] = failures
        none = int(self._acc["no_solution"].item()) if "no_solution" in self._acc else 0
        out["no_solution"] = none
        if failures > none:
            warnings.warn(f"MTLOptimizer: the {method} solver did not converge on "
                          f"{failures - none} of {self._steps} steps (weights used: its last "
                          "iterate); raise max_iter or check the gradients", RuntimeWarning,
                          stacklevel=3)
        if none:
            warnings.warn(f"MTLOptimizer: the {method} problem had no solution on {none} of "
                          f"{self._steps} steps (0 in the convex hull of the task gradients: a "
                          "Pareto-stationary point; update used: 0)", RuntimeWarning,
                          stacklevel=3)
        if reset:
            self._acc = {}
            self._steps = 0
        return out

    @property
    def nonconverged_total(self) -> int:
        """Solver failures since construction (synchronises)."""
        return 0 if self._nonconverged_total is None else int(self._nonconverged_total.item())
