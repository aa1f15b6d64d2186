"""Task types with streaming metrics: dense prediction (segmentation, depth, surface normals) and
binary attributes.

The trainer's other tasks (:mod:`.types`) compute their metrics from a whole split's predictions
at once. The tasks here never hold a split's predictions: each keeps a small *metric state* on the
device (a confusion matrix, sums, a histogram), updated once per batch without a host
synchronisation, and turned into metrics once per split:

``state = task.metric_state(device)``; per batch ``task.update(state, task.predict(out), y)``;
at the end ``task.finish(state) -> {metric: 0-dim tensor}``. Every state entry is a sum over
samples, so the states of several processes add up (``all_reduce`` with SUM) to the state of the
whole split. ``metrics_of(pred, y)`` (the interface of :class:`.types.Task`) runs the three steps
on one batch.

Definitions (the protocol of MTAN, Liu et al., "End-to-End Multi-Task Learning with Attention",
CVPR 2019, used by Nash-MTL and FAMO):

- :class:`Segmentation`: ``miou`` (mean over classes of ``TP / (TP + FP + FN)``, over the classes
  that occur in the targets or the predictions of the split) and ``pixel_acc``, both from one
  confusion matrix accumulated over the whole split; pixels labelled ``-1`` are ignored.
- :class:`Depth`: ``abs_err`` (mean ``|p - y|``) and ``rel_err`` (mean ``|p - y| / y``) over the
  pixels whose ground truth is not 0. **Pooled over the split**: sums over every valid pixel of
  the split divided by their count (as LibMTL does). MTAN's code (and Nash-MTL's and FAMO's,
  which copy it) average the per-batch means instead, which weighs a batch with few valid pixels
  as much as one with many; the two differ slightly.
- :class:`Normals`: the angle between the L2-normalised prediction and the (normalised) ground
  truth, in degrees, over the pixels whose ground-truth vector is not all zero: ``mean``,
  ``median`` (from a histogram of 0.01° bins: exact to 0.01°) and the fractions of pixels within
  11.25°, 22.5° and 30° (``within_11_25``, ``within_22_5``, ``within_30``; strict ``<``, as
  MTAN). Angles are computed as ``atan2(|p x y|, p . y)``, accurate also for small angles.
- :class:`Attribute`: one binary attribute (a CelebA-style task): ``accuracy`` and ``f1`` of the
  positive class from the counts of true/false positives/negatives.
  :func:`mean_over_attributes` gives the means over several attribute tasks.

Losses: cross-entropy over the non-ignored pixels (segmentation), L1 over valid pixels (depth),
``1 - cos`` over valid pixels (normals), binary cross-entropy (attributes). A batch without any
valid pixel has loss 0 (the empty sum) rather than the 0/0 of a plain mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .types import Task, f1_from_counts

__all__ = ["StreamingTask", "Segmentation", "Depth", "Normals", "Attribute", "is_dense",
           "is_streaming", "mean_over_attributes", "ANGLE_BIN_DEG", "THRESHOLDS_DEG"]

#: The width of the histogram bins of the normals' median, in degrees.
ANGLE_BIN_DEG = 0.01
_ANGLE_BINS = int(round(180.0 / ANGLE_BIN_DEG))
#: The thresholds of the normals' "within" fractions, in degrees, and their metric names.
THRESHOLDS_DEG = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}


def is_streaming(task: Task) -> bool:
    """Whether ``task`` has streaming metrics (``metric_state`` / ``update`` / ``finish``)."""
    return isinstance(task, StreamingTask)


def is_dense(task: Task) -> bool:
    """Whether ``task`` predicts a map ``[B, n_out, H, W]`` (segmentation, depth, normals)."""
    return isinstance(task, StreamingTask) and task.dense


@dataclass(frozen=True)
class StreamingTask(Task):
    """A task whose metrics accumulate per batch (see the module docstring)."""

    dense = False

    def metric_state(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def update(self, state: dict[str, torch.Tensor], pred: torch.Tensor, y: torch.Tensor
               ) -> None:
        raise NotImplementedError  # pragma: no cover

    def finish(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def metrics_of(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The metrics of one batch (or of a whole split given at once)."""
        state = self.metric_state(pred.device)
        self.update(state, pred, y)
        return self.finish(state)


def _check_map(x: torch.Tensor, y: torch.Tensor, channels: int, what: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{what}: expected an output [B, {channels}, H, W], got "
                         f"{list(x.shape)}")
    if y.shape[0] != x.shape[0] or y.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"{what}: target {list(y.shape)} does not match output "
                         f"{list(x.shape)}")


@dataclass(frozen=True)
class Segmentation(StreamingTask):
    """Semantic segmentation into ``n_out`` classes; targets ``[B, H, W]`` int64, ``-1`` ignored.
    Metrics ``miou`` (up) and ``pixel_acc`` (up) from a confusion matrix over the split."""

    dense = True

    def __post_init__(self):
        if self.n_out < 2:
            raise ValueError(f"Segmentation: n_out must be >= 2 classes, got {self.n_out}")
        object.__setattr__(self, "directions", {"miou": "up", "pixel_acc": "up"})

    def loss(self, out, y):
        _check_map(out, y, self.n_out, f"Segmentation({self.name!r}).loss")
        per_pixel = F.cross_entropy(out.float(), y.long(), ignore_index=-1, reduction="none")
        valid = (y >= 0).sum()
        return per_pixel.sum() / valid.clamp_min(1)

    def predict(self, out):
        return out.argmax(1)

    def metric_state(self, device):
        return {"confusion": torch.zeros(self.n_out * self.n_out, dtype=torch.int64,
                                         device=device)}

    def update(self, state, pred, y):
        y = y.reshape(-1).long()
        p = pred.reshape(-1).long()
        valid = y >= 0
        idx = y[valid] * self.n_out + p[valid]
        state["confusion"] += torch.bincount(idx, minlength=self.n_out ** 2)

    def finish(self, state):
        c = state["confusion"].reshape(self.n_out, self.n_out).to(torch.float64)
        tp = c.diagonal()
        union = c.sum(0) + c.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp))
        miou = iou.sum() / present.sum()          # 0/0 = nan for a split without any pixel
        return {"miou": miou, "pixel_acc": tp.sum() / c.sum()}


@dataclass(frozen=True)
class Depth(StreamingTask):
    """Depth (or inverse depth) regression, one channel; targets ``[B, 1, H, W]``, 0 = no ground
    truth. Metrics ``abs_err`` (down) and ``rel_err`` (down), pooled over the split's valid
    pixels."""

    dense = True

    def __post_init__(self):
        if self.n_out != 1:
            raise ValueError(f"Depth: n_out must be 1, got {self.n_out}")
        object.__setattr__(self, "directions", {"abs_err": "down", "rel_err": "down"})

    def loss(self, out, y):
        _check_map(out, y, 1, f"Depth({self.name!r}).loss")
        valid = (y != 0).to(out.dtype)
        return ((out.float() - y.float()).abs() * valid).sum() / valid.sum().clamp_min(1)

    def predict(self, out):
        return out.float()

    def metric_state(self, device):
        return {"sums": torch.zeros(3, dtype=torch.float64, device=device)}

    def update(self, state, pred, y):
        valid = y != 0
        err = (pred.to(torch.float64) - y.to(torch.float64)).abs()
        yy = torch.where(valid, y.to(torch.float64), torch.ones_like(err))
        state["sums"] += torch.stack([(err * valid).sum(), (err / yy.abs() * valid).sum(),
                                      valid.sum().to(torch.float64)])

    def finish(self, state):
        s = state["sums"]
        return {"abs_err": s[0] / s[2], "rel_err": s[1] / s[2]}


@dataclass(frozen=True)
class Normals(StreamingTask):
    """Surface normals, three channels; targets ``[B, 3, H, W]``, an all-zero vector = no ground
    truth. Metrics ``mean`` and ``median`` angle error in degrees (down) and the fractions within
    11.25, 22.5 and 30 degrees (up)."""

    n_out: int = 3
    dense = True

    def __post_init__(self):
        if self.n_out != 3:
            raise ValueError(f"Normals: n_out must be 3, got {self.n_out}")
        dirs = {"mean": "down", "median": "down"}
        dirs.update({k: "up" for k in THRESHOLDS_DEG})
        object.__setattr__(self, "directions", dirs)

    def loss(self, out, y):
        _check_map(out, y, 3, f"Normals({self.name!r}).loss")
        valid = (y != 0).any(1).to(torch.float32)
        cos = (F.normalize(out.float(), dim=1) * y.float()).sum(1)
        return ((1 - cos) * valid).sum() / valid.sum().clamp_min(1)

    def predict(self, out):
        return F.normalize(out.float(), dim=1)

    def metric_state(self, device):
        return {"hist": torch.zeros(_ANGLE_BINS, dtype=torch.int64, device=device),
                "sums": torch.zeros(2 + len(THRESHOLDS_DEG), dtype=torch.float64,
                                    device=device)}

    def update(self, state, pred, y):
        valid = (y != 0).any(1)
        p = F.normalize(pred.float(), dim=1).movedim(1, -1)[valid]
        t = F.normalize(y.float(), dim=1).movedim(1, -1)[valid]
        ang = torch.rad2deg(torch.atan2(torch.linalg.cross(p, t).norm(dim=-1),
                                        (p * t).sum(-1))).to(torch.float64)
        b = (ang / ANGLE_BIN_DEG).long().clamp_(0, _ANGLE_BINS - 1)
        state["hist"] += torch.bincount(b, minlength=_ANGLE_BINS)
        within = [(ang < v).sum() for v in THRESHOLDS_DEG.values()]
        state["sums"] += torch.stack([ang.sum(), torch.tensor(float(ang.numel()),
                                      dtype=torch.float64, device=ang.device),
                                      *[w.to(torch.float64) for w in within]])

    def finish(self, state):
        s, hist = state["sums"], state["hist"]
        n = s[1]
        # the median: the centre of the bin holding the value of rank ceil(n / 2)
        cum = hist.cumsum(0)
        k = torch.ceil(n / 2).clamp_min(1).to(torch.int64)
        b = torch.searchsorted(cum, k.reshape(1)).reshape(())
        median = (b.to(torch.float64) + 0.5) * ANGLE_BIN_DEG
        median = torch.where(n > 0, median, torch.full_like(median, math.nan))
        out = {"mean": s[0] / n, "median": median}
        out.update({k: s[2 + i] / n for i, k in enumerate(THRESHOLDS_DEG)})
        return out


@dataclass(frozen=True)
class Attribute(StreamingTask):
    """One binary attribute (one logit; targets 0/1 float ``[B]``): binary cross-entropy;
    ``accuracy`` (up) and ``f1`` (up) of the positive class (0 when neither the targets nor the
    predictions hold a positive), from counts over the split."""

    def __post_init__(self):
        if self.n_out != 1:
            raise ValueError(f"Attribute: n_out must be 1, got {self.n_out}")
        object.__setattr__(self, "directions", {"accuracy": "up", "f1": "up"})

    def loss(self, out, y):
        return F.binary_cross_entropy_with_logits(out.float().reshape(-1), y.float().reshape(-1))

    def predict(self, out):
        return (out.reshape(-1) > 0).to(torch.float32)

    def metric_state(self, device):
        return {"counts": torch.zeros(4, dtype=torch.float64, device=device)}  # tp fp fn tn

    def update(self, state, pred, y):
        p = pred.reshape(-1).to(torch.float64)
        t = y.reshape(-1).to(torch.float64)
        state["counts"] += torch.stack([(p * t).sum(), (p * (1 - t)).sum(),
                                        ((1 - p) * t).sum(), ((1 - p) * (1 - t)).sum()])

    def finish(self, state):
        tp, fp, fn, tn = state["counts"].unbind()
        return {"accuracy": (tp + tn) / (tp + fp + fn + tn), "f1": f1_from_counts(tp, fp, fn)}


def mean_over_attributes(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{metric: mean over tasks}`` of per-attribute metrics ``{task: {metric: value}}`` (the
    summary CelebA papers print: mean accuracy and mean F1 over the 40 attributes).

    Raises:
        ValueError: no task, or tasks with different metric names.
    """
    if not metrics:
        raise ValueError("mean_over_attributes: metrics holds no task")
    names = [set(m) for m in metrics.values()]
    if any(n != names[0] for n in names):
        raise ValueError("mean_over_attributes: the tasks have different metrics")
    return {k: sum(m[k] for m in metrics.values()) / len(metrics) for k in names[0]}
