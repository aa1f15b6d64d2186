"""A diverged run: a non-finite loss, or validation metrics collapsed to chance level.

A run that diverges must not look like a result: a dead network computes (almost) no conflicting
gradients, so averaging it into the ST paper's Table 1 (Zhang et al., "Proactive Gradient
Conflict Mitigation in Multi-Task Learning: A Sparse Training Perspective", 2024) would make its
method look conflict-free. :func:`check_epoch` is called once per epoch on the epoch's lines that
the loop has already read to the host (no extra device synchronisation) and returns a
:class:`Divergence` when

1. **non-finite**: a training loss (the epoch's mean, so one NaN / inf step is enough) or a
   validation loss of some task is NaN or infinite, checked at every epoch (metrics are not:
   some are undefined, NaN, on a split without a valid pixel, which is no divergence; a
   network with NaN outputs has NaN losses); or
2. **chance level**: for :data:`CHANCE_PATIENCE` consecutive epochs, none before epoch
   :data:`CHANCE_FROM_EPOCH`, *every* task that has a chance rule scores no better on the
   validation split than the best constant prediction (a network that learned nothing, or
   stopped knowing anything), within a margin:

   - classification (:class:`~gradops.train.tasks.types.Classification`) and binary attributes
     (:class:`~gradops.train.tasks.types.Binary`, :class:`~gradops.train.tasks.dense.Attribute`):
     ``accuracy <= chance + CHANCE_MARGIN``, chance = the frequency of the validation split's
     most frequent class (``1 / n_classes`` on balanced data; a constant predictor's best
     accuracy);
   - regression (:class:`~gradops.train.tasks.types.Regression`):
     ``mae >= (1 - REGRESSION_MARGIN) x`` the MAE of predicting the validation targets' median
     (the best constant under MAE);
   - dense tasks (segmentation, depth, normals) have no chance rule and are not checked for it.

   All tasks must be at chance (not one): a single task at chance can be negative transfer in a
   working network, which the report should show, not hide. The first epoch is not counted
   (a healthy run can still be near chance after it), and the epochs must be consecutive: a
   slow but learning run that is near chance for an epoch or two is not stopped; the earliest
   stop for chance is epoch ``CHANCE_FROM_EPOCH + CHANCE_PATIENCE - 1`` (4), so runs of 3
   epochs or fewer are checked for non-finite values only. (Seen on ``digits``: ``--lr 8e-3``,
   seed 0, stays at validation accuracy ~9% with the cross-entropy at ln 10 from epoch 1 on
   and stops at epoch 4; a width-4 FAMO run with a decaying rate that crawls from 9% to 12%
   in 3 epochs is not stopped.) The streak is part of the run's checkpointed history, so a
   resumed run decides as an uninterrupted one.

The run then stops after that epoch (its lines are written, with non-finite numbers as ``null``),
writes ``result.json`` with ``"status": "diverged"`` and ``"divergence": {"epoch", "task",
"reason"}``, prints one line naming the epoch and the task, and ``gradops train`` exits with
:data:`EXIT_DIVERGED`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..tasks.dense import Attribute
from ..tasks.types import Binary, Classification, Regression

__all__ = ["CHANCE_FROM_EPOCH", "CHANCE_MARGIN", "CHANCE_PATIENCE", "EXIT_DIVERGED",
           "REGRESSION_MARGIN",
           "ChanceLevel", "Divergence", "chance_levels", "check_epoch", "strict_json"]

#: ``gradops train``'s exit status for a diverged run (2 is a usage error).
EXIT_DIVERGED = 3
#: The first epoch (from 1) counted towards a chance-level streak.
CHANCE_FROM_EPOCH = 2
#: Consecutive epochs at chance on every task that stop a run.
CHANCE_PATIENCE = 3
#: Accuracy points above the best constant predictor's accuracy that still count as chance.
CHANCE_MARGIN = 0.02
#: Relative margin below the best constant predictor's MAE that still counts as chance.
REGRESSION_MARGIN = 0.02


@dataclasses.dataclass(frozen=True)
class ChanceLevel:
    """A task's chance rule: ``metric`` at ``level`` (the best constant prediction's score);
    ``direction`` "up" (at chance when ``value <= level + margin``) or "down" (at chance when
    ``value >= level * (1 - margin)``)."""
    metric: str
    level: float
    direction: str

    def at_chance(self, value: float) -> bool:
        if self.direction == "up":
            return value <= self.level + CHANCE_MARGIN
        return value >= self.level * (1.0 - REGRESSION_MARGIN)

    def describe(self, value: float) -> str:
        op = "<=" if self.direction == "up" else ">="
        bound = (self.level + CHANCE_MARGIN if self.direction == "up"
                 else self.level * (1.0 - REGRESSION_MARGIN))
        return f"{self.metric} {value:.4g} {op} {bound:.4g}"


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Where and why a run diverged."""
    epoch: int
    task: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "task": self.task, "reason": self.reason}

    def message(self, prog: str = "gradops train") -> str:
        return f"{prog}: diverged at epoch {self.epoch}, task {self.task}: {self.reason}"


def chance_levels(tasks: Sequence[Any], targets: Mapping[str, torch.Tensor]
                  ) -> dict[str, ChanceLevel]:
    """The chance rule of each task that has one (see the module docstring), from the validation
    split's ``targets`` (read once, when the run starts)."""
    out: dict[str, ChanceLevel] = {}
    for t in tasks:
        y = targets.get(t.name)
        if y is None or y.numel() == 0:
            continue
        y = y.detach().reshape(-1).cpu()
        if type(t) is Classification:
            counts = torch.bincount(y.long().clamp_min(0), minlength=t.n_out)
            out[t.name] = ChanceLevel("accuracy", float(counts.max()) / y.numel(), "up")
        elif type(t) in (Binary, Attribute):
            p = float((y > 0.5).double().mean())
            out[t.name] = ChanceLevel("accuracy", max(p, 1.0 - p), "up")
        elif type(t) is Regression:
            y = y.double()
            out[t.name] = ChanceLevel("mae", float((y - y.median()).abs().mean()), "down")
    return out


def _first_nonfinite(values: Mapping[str, Any]) -> tuple[str, str, float] | None:
    """(task, what, value) of the first non-finite number in ``{task: number | {k: number}}``."""
    for task, v in values.items():
        if isinstance(v, Mapping):
            for k, x in v.items():
                if isinstance(x, float) and not math.isfinite(x):
                    return task, k, x
        elif isinstance(v, float) and not math.isfinite(v):
            return task, "loss", v
    return None


def check_epoch(epoch: int, train_line: Mapping[str, Any], val_line: Mapping[str, Any] | None,
                chance: Mapping[str, ChanceLevel], streak: int = 0
                ) -> tuple[Divergence | None, int]:
    """The divergence of ``epoch`` (see the module docstring) or None, and the new count of
    consecutive epochs at chance (``streak``: the count after the previous epoch).
    ``train_line`` and ``val_line`` are the epoch's metrics.jsonl objects (host floats)."""
    bad = _first_nonfinite(train_line.get("losses", {}))
    if bad is not None:
        return Divergence(epoch, bad[0], f"training loss is {bad[2]}"), streak
    if val_line is None:
        return None, streak
    bad = _first_nonfinite(val_line.get("losses", {}))
    if bad is not None:
        return Divergence(epoch, bad[0], f"validation loss is {bad[2]}"), streak
    if epoch < CHANCE_FROM_EPOCH or not chance:
        return None, 0
    metrics = val_line.get("metrics", {})
    parts = []
    for task, rule in chance.items():
        value = metrics.get(task, {}).get(rule.metric)
        if value is None or not rule.at_chance(value):
            return None, 0
        parts.append(f"{task} {rule.describe(value)}")
    streak += 1
    if streak < CHANCE_PATIENCE:
        return None, streak
    tasks = list(chance)
    return Divergence(epoch, tasks[0] if len(tasks) == 1 else "all (" + ", ".join(tasks) + ")",
                      f"validation metrics at chance level on every task for {streak} epochs ("
                      + "; ".join(parts) + ")"), streak


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON ``null``), so that
    ``json.dumps(..., allow_nan=False)`` writes strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
