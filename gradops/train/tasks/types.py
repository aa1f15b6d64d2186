"""Task types of the trainer: each knows its head size, its loss, its prediction and its metrics.

Three types:

- :class:`Classification` (``C`` classes, cross-entropy): ``accuracy`` and ``macro_f1`` (the
  unweighted mean over classes of ``2 TP / (2 TP + FP + FN)``, over the classes that occur in
  the targets or the predictions, as scikit-learn's ``f1_score(average="macro")``).
- :class:`Binary` (one logit, binary cross-entropy; a CelebA-style attribute): ``accuracy`` and
  ``f1`` of the positive class (0 when there is no positive in targets or predictions).
- :class:`Regression` (one output, mean squared error on ``(y - offset) / scale``): ``mae`` in the
  target's own units.

Every metric has a direction (:attr:`Task.directions`): ``"up"`` when higher is better. Metrics
are computed on device from whole splits and read once (``metrics_of`` returns tensors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Task", "Classification", "Binary", "Regression", "macro_f1", "binary_f1"]


def f1_from_counts(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """``2 TP / (2 TP + FP + FN)``, 0 where the denominator is 0 (elementwise)."""
    den = 2 * tp + fp + fn
    return torch.where(den > 0, 2 * tp / den.clamp_min(1), torch.zeros_like(den))


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Macro-averaged F1 over the classes present in ``target`` or ``pred`` (0-dim float)."""
    p = F.one_hot(pred.long(), num_classes).to(torch.float64)
    t = F.one_hot(target.long(), num_classes).to(torch.float64)
    tp = (p * t).sum(0)
    fp = (p * (1 - t)).sum(0)
    fn = ((1 - p) * t).sum(0)
    present = (p.sum(0) + t.sum(0)) > 0
    f1 = f1_from_counts(tp, fp, fn)
    return (f1 * present).sum() / present.sum().clamp_min(1)


def binary_f1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """F1 of the positive class (0-dim float; 0 when neither holds a positive)."""
    p, t = pred.to(torch.float64), target.to(torch.float64)
    return f1_from_counts((p * t).sum(), (p * (1 - t)).sum(), ((1 - p) * t).sum())


@dataclass(frozen=True)
class Task:
    """One task: ``name``, head width ``n_out``; subclasses define loss, prediction, metrics."""

    name: str

    n_out: int = 1
    directions: dict | None = None

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def predict(self, out: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def metrics_of(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover


@dataclass(frozen=True)
class Classification(Task):
    """``n_out``-way classification: cross-entropy; accuracy (up), macro-F1 (up)."""

    def __post_init__(self):
        object.__setattr__(self, "directions", {"accuracy": "up", "macro_f1": "up"})

    def loss(self, out, y):
        return F.cross_entropy(out.float(), y)

    def predict(self, out):
        return out.argmax(-1)

    def metrics_of(self, pred, y):
        return {"accuracy": (pred == y).to(torch.float64).mean(),
                "macro_f1": macro_f1(pred, y, self.n_out)}


@dataclass(frozen=True)
class Binary(Task):
    """A binary attribute (one logit; target 0/1 float): BCE; accuracy (up), F1 (up)."""

    def __post_init__(self):
        object.__setattr__(self, "directions", {"accuracy": "up", "f1": "up"})

    def loss(self, out, y):
        return F.binary_cross_entropy_with_logits(out.float().reshape(-1), y)

    def predict(self, out):
        return (out.reshape(-1) > 0).to(torch.float32)

    def metrics_of(self, pred, y):
        return {"accuracy": (pred == y).to(torch.float64).mean(), "f1": binary_f1(pred, y)}


@dataclass(frozen=True)
class Regression(Task):
    """Scalar regression: the head predicts ``(y - offset) / scale``; MSE in those units as the
    loss; mean absolute error in the target's units (down)."""

    offset: float = 0.0
    scale: float = 1.0
    def __post_init__(self):
        object.__setattr__(self, "directions", {"mae": "down"})

    def loss(self, out, y):
        return F.mse_loss(out.float().reshape(-1), (y - self.offset) / self.scale)

    def predict(self, out):
        return out.float().reshape(-1) * self.scale + self.offset

    def metrics_of(self, pred, y):
        return {"mae": (pred.to(torch.float64) - y.to(torch.float64)).abs().mean()}
