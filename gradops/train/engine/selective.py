"""Selective task-group updates with proximal inter-task affinity ("Selective Task Group
Updates for Multi-Task Optimization", ICLR 2025, Sec. 3.2-3.3, Algorithm 1).

Per batch the tasks are split into groups; each group in turn runs a forward, a backward of its
summed loss and an optimizer step. The loss ratio of every task across one group's step gives
the proximal inter-task affinity from that group to the task,
``a = 1 - L_t(after) / L_t(before)``, divided by the group's size; it is tracked per ordered task
pair ``(s, t)`` (for every source task ``s`` of the group) as an exponential moving average,
``A <- (1 - decay) A + decay * a``. Within a group (the paper's intra-group relations) the pair
``(s, t)`` gets ``+|a|`` when both tasks' losses fell and ``-|a|`` otherwise. The first
``warmup`` batches use singleton groups; afterwards the groups come from affinity propagation
(scikit-learn's ``AffinityPropagation``, as the authors' code) on the column-normalised,
symmetrised matrix ``S = (M + M^T) / 2``, ``M[:, t] = A[:, t] / max_s |A[s, t]|``, with
preference 0: a task joins another's group only through positive mutual affinity. When every
off-diagonal entry of ``S`` is the same (always so for two tasks), affinity propagation has no
exemplar to prefer and the rule is applied directly: one group if that entry is positive, else
singletons. When affinity
propagation does not converge the previous groups are kept and the event is counted
(:attr:`SelectiveGroups.ap_failures`).

Attribution: the loss change measured between the forward before group ``k``'s step and the
forward after it is credited to group ``k`` (the authors' public code credits it to the next
group; that off-by-one is not reproduced). The change caused by the last group is measured with
one more forward without gradients (BatchNorm running statistics restored), so a batch costs
``K + 1`` forwards and ``K`` backwards for ``K`` groups.

API: :class:`SelectiveGroups` (the affinity and the groups) and :func:`selective_step` (one
batch, given the closures that compute the losses and take a step), which the trainer's loop
calls for ``--method selective``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["SelectiveGroups", "selective_step"]


class SelectiveGroups:
    """Tracked proximal inter-task affinity and the current task groups.

    Args:
        T: number of tasks (>= 1).
        decay: the EMA's weight of a new measurement, in ``(0, 1]`` (paper: 0.001).
        warmup: batches with singleton groups before the first grouping (paper: 100).
        regroup_every: batches between groupings after the warm-up.
        device: where the affinity matrix lives (read on the host only when grouping).
    """

    def __init__(self, T: int, decay: float = 0.001, warmup: int = 100, regroup_every: int = 1,
                 device: torch.device | str = "cpu"):
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"SelectiveGroups: T must be an int >= 1, got {T!r}")
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"SelectiveGroups: decay must be in (0, 1], got {decay!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"SelectiveGroups: warmup must be an int >= 0, got {warmup!r}")
        if (isinstance(regroup_every, bool) or not isinstance(regroup_every, int)
                or regroup_every < 1):
            raise ValueError(f"SelectiveGroups: regroup_every must be an int >= 1, got "
                             f"{regroup_every!r}")
        self.T, self.decay, self.warmup, self.regroup_every = T, float(decay), warmup, \
            regroup_every
        self.affinity = torch.zeros(T, T, dtype=torch.float64, device=device)
        self.groups: list[tuple[int, ...]] = [(t,) for t in range(T)]
        self.steps = 0
        self.ap_failures = 0
        self.history: list[list[tuple[int, ...]]] = []     # the groups used at each batch

    def record(self, group: Sequence[int], before: torch.Tensor, after: torch.Tensor) -> None:
        """Credit the loss change ``before -> after`` (``[T]`` each, every task's loss on the
        same batch) to ``group``, the group whose step happened in between."""
        g = sorted(set(int(t) for t in group))
        if not g or g[0] < 0 or g[-1] >= self.T:
            raise ValueError(f"SelectiveGroups.record: group must hold task indices in "
                             f"[0, {self.T}), got {list(group)}")
        if before.shape != (self.T,) or after.shape != (self.T,):
            raise ValueError(f"SelectiveGroups.record: before and after must be [{self.T}], got "
                             f"{tuple(before.shape)} and {tuple(after.shape)}")
        dev = self.affinity.device
        r = 1.0 - after.detach().to(dev, torch.float64) / before.detach().to(dev, torch.float64)
        n = float(len(g))
        inside = torch.zeros(self.T, dtype=torch.bool, device=dev)
        inside[g] = True
        a = (r / n).unsqueeze(0).expand(self.T, self.T).clone()       # a[s, t] = r_t / |g|
        intra = inside.unsqueeze(1) & inside.unsqueeze(0) & ~torch.eye(self.T, dtype=torch.bool,
                                                                        device=dev)
        fell = r > 0
        both = fell.unsqueeze(1) & fell.unsqueeze(0)
        a = torch.where(intra, torch.where(both, a.abs(), -a.abs()), a)
        rows = torch.tensor(g, device=dev)
        self.affinity[rows] = (1.0 - self.decay) * self.affinity[rows] + self.decay * a[rows]

    def end_step(self) -> list[tuple[int, ...]]:
        """Close a batch (log its groups) and regroup when due; returns the next groups."""
        self.history.append(list(self.groups))
        self.steps += 1
        if self.steps >= self.warmup and (self.steps - self.warmup) % self.regroup_every == 0:
            self.groups = self.cluster()
        return self.groups

    def normalised(self) -> torch.Tensor:
        """``(M + M^T) / 2`` with ``M[:, t] = A[:, t] / max_s |A[s, t]|`` (host, float64)."""
        A = self.affinity.cpu()
        scale = A.abs().amax(dim=0)
        M = torch.where(scale > 0, A / torch.where(scale > 0, scale, torch.ones_like(scale)),
                        torch.zeros_like(A))
        return (M + M.T) / 2

    def cluster(self) -> list[tuple[int, ...]]:
        """Groups by affinity propagation (module docstring); groups ordered by their smallest
        task."""
        if self.T == 1:
            return [(0,)]
        from sklearn.cluster import AffinityPropagation
        from sklearn.exceptions import ConvergenceWarning
        S = self.normalised().numpy()
        if not (abs(S) < float("inf")).all():
            raise FloatingPointError("SelectiveGroups: the affinity holds non-finite values")
        off = S[~torch.eye(self.T, dtype=torch.bool).numpy()]
        if (off == off[0]).all():
            # affinity propagation has no exemplar to prefer (always the case for T = 2): one
            # group when the mutual affinity is positive, else singletons
            return [tuple(range(self.T))] if off[0] > 0 else [(t,) for t in range(self.T)]
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            try:
                labels = AffinityPropagation(affinity="precomputed", preference=0.0,
                                             random_state=0).fit(S).labels_
            except ConvergenceWarning:
                labels = None
        if labels is None or (labels < 0).any():
            self.ap_failures += 1
            return self.groups
        out: dict[int, list[int]] = {}
        for t, lab in enumerate(labels.tolist()):
            out.setdefault(lab, []).append(t)
        return sorted((tuple(v) for v in out.values()), key=lambda g: g[0])

    def state_dict(self) -> dict[str, Any]:
        return {"affinity": self.affinity.clone(), "groups": [list(g) for g in self.groups],
                "steps": self.steps, "ap_failures": self.ap_failures,
                "history": [[list(g) for g in gs] for gs in self.history]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.affinity.copy_(sd["affinity"])
        self.groups = [tuple(g) for g in sd["groups"]]
        self.steps = int(sd["steps"])
        self.ap_failures = int(sd["ap_failures"])
        self.history = [[tuple(g) for g in gs] for gs in sd["history"]]


def selective_step(sel: SelectiveGroups,
                   forward: Callable[[], tuple[list[torch.Tensor], Any]],
                   update: Callable[[torch.Tensor], None],
                   measure: Callable[[], list[torch.Tensor]],
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, Any]:
    """One batch of selective group updates.

    Args:
        sel: the affinity tracker (its current groups are used, then it regroups).
        forward: runs the model on the batch, returns the ``T`` losses (with their graph) and
            the outputs.
        update: takes a group's summed loss: backward and optimizer step.
        measure: the ``T`` losses after the last step, without gradients.
        reduce: applied to every measured loss vector before it is used (e.g. the mean over
            the processes, so that every process tracks the same affinity and groups).
    Returns:
        the losses before the batch's first step (``[T]``, detached) and that forward's
        outputs (what the trainer reports for the epoch's train line).
    """
    groups = list(sel.groups)

    def vec(ls: list[torch.Tensor]) -> torch.Tensor:
        v = torch.stack([x.detach().float() for x in ls])
        return reduce(v) if reduce is not None else v

    losses, outs = forward()
    first = vec(losses)
    before = first
    for k, g in enumerate(groups):
        update(torch.stack([losses[t] for t in g]).sum())
        if k + 1 < len(groups):
            losses, _ = forward()            # the next group's forward measures group k's step
            after = vec(losses)
        else:
            after = vec(measure())
        sel.record(g, before, after)         # credited to group k, the one that stepped
        before = after
    sel.end_step()
    return first, outs
