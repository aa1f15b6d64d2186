"""Gradient probes: inter-task against inter-sample gradient similarity (Elich et al.,
"Examining Common Paradigms in Multi-Task Learning", Sec. 4.2, Fig. 4, App. A3.2).

Every ``every`` training steps, on the first ``samples`` samples of the step's batch (the batch
order is already random, so no random numbers are drawn and a resumed run stays bit-exact),
the per-sample gradient of every task's loss with respect to the shared parameters is computed
with :mod:`torch.func` (``vmap`` over ``jacrev`` of the vector of task losses, through
:func:`torch.func.functional_call`): ``g[t, i]``. Then

- *inter-task*: for each sample ``i``, every pair of tasks ``(g[s, i], g[t, i])``;
- *inter-sample*: for each task ``t``, every pair of samples ``(g[t, i], g[t, j])``;

each pair gives its cosine, its gradient magnitude similarity (GMS) and its sign-conflict ratio
(the fraction of coordinates with opposite signs among those non-zero in both), all from one
:func:`gradops.gram` pass with sign counts. Per epoch the values of each (setup, measure) are
summarised as mean, standard deviation (population, ``ddof = 0``), 2.5 and 97.5 percentiles
(linear interpolation, numpy's default) and their count.

BatchNorm: the per-sample forward runs with the model in eval mode, so BatchNorm normalises
with its running statistics (a single sample has no batch statistics, and the per-sample
gradients then do not depend on the other samples); dropout is off for the same reason. The
running statistics are not updated by the probe, and the model's mode is restored afterwards.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ... import metrics
from ...ops.gram import gram
from ..config.extras import parse_probe

__all__ = ["GradientProbe", "parse_probe", "per_sample_task_gradients", "pair_statistics",
           "PROBE_COLUMNS"]

PROBE_COLUMNS = ("epoch", "setup", "measure", "mean", "std", "p2_5", "p97_5", "n")
MEASURES = ("cos", "gms", "sign_conflict")


def per_sample_task_gradients(model: nn.Module, shared: Sequence[torch.Tensor], tasks,
                              x: torch.Tensor, ys: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[T, N, P]``: per task, per sample of ``x``, the gradient of the task's loss on that
    sample with respect to ``shared`` (flattened, concatenated in order), with ``model`` in
    eval mode (module docstring). ``model(x)`` must return ``{task name: output}``."""
    ids = {id(p) for p in shared}
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if id(p) in ids]
    if len(names) != len(ids):
        raise ValueError("per_sample_task_gradients: shared holds tensors that are not "
                         "parameters of model")
    order = {id(p): i for i, p in enumerate(shared)}
    names.sort(key=lambda n: order[id(named[n])])
    sh = {n: named[n].detach() for n in names}
    rest = {n: p.detach() for n, p in named.items() if n not in sh}
    rest.update({n: b for n, b in model.named_buffers()})

    def losses(params: dict[str, torch.Tensor], xi: torch.Tensor,
               yi: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(model, {**rest, **params}, (xi.unsqueeze(0),))
        return torch.stack([t.loss(out[t.name], yi[t.name].unsqueeze(0)) for t in tasks])

    was = model.training
    model.eval()
    try:
        jac = vmap(jacrev(losses), in_dims=(None, 0, 0))(sh, x, ys)
    finally:
        model.train(was)
    N, T = x.shape[0], len(tasks)
    flat = torch.cat([jac[n].reshape(N, T, -1) for n in names], dim=-1)
    return flat.transpose(0, 1).contiguous()


def pair_statistics(J: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cosine, GMS and sign-conflict ratio of every unordered pair of rows of ``J`` ``[R, P]``
    (1-D tensors of ``R (R - 1) / 2`` values each, on device)."""
    r = gram(J.float(), return_sign_counts=True)
    R = J.shape[0]
    i = torch.arange(R, device=J.device)
    up = i.unsqueeze(1) < i.unsqueeze(0)
    return {"cos": metrics.cosine(r.gram)[up], "gms": metrics.gms(r.gram)[up],
            "sign_conflict": metrics.sign_conflict_ratio(r.opposite, r.both_nonzero)[up]}


class GradientProbe:
    """Per-epoch inter-task / inter-sample gradient statistics (module docstring).

    Args:
        every: probe every ``every``-th step (the 1st, the ``every + 1``-th, ...).
        samples: samples per probe (the first of the batch; fewer if the batch is smaller).
    """

    def __init__(self, every: int = 5, samples: int = 8):
        if every < 1 or samples < 2:
            raise ValueError(f"GradientProbe: every must be >= 1 and samples >= 2, got "
                             f"{every}, {samples}")
        self.every, self.samples = every, samples
        self.steps = 0
        self._values: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.rows: list[dict[str, Any]] = []

    def step(self, model: nn.Module, shared: Sequence[torch.Tensor], tasks,
             x: torch.Tensor, ys: dict[str, torch.Tensor]) -> bool:
        """Count a training step; probe it when due (before the optimizer step). Returns
        whether it probed."""
        self.steps += 1
        if (self.steps - 1) % self.every:
            return False
        n = min(self.samples, x.shape[0])
        g = per_sample_task_gradients(model, shared, tasks, x[:n],
                                      {k: v[:n] for k, v in ys.items()})
        T = g.shape[0]
        if T >= 2:
            for i in range(n):
                self._add("inter_task", pair_statistics(g[:, i]))
        for t in range(T):
            self._add("inter_sample", pair_statistics(g[t]))
        return True

    def _add(self, setup: str, stats: dict[str, torch.Tensor]) -> None:
        for m, v in stats.items():
            self._values.setdefault((setup, m), []).append(v.detach().double())

    def end_epoch(self, epoch: int) -> list[dict[str, Any]]:
        """Summarise and reset the epoch's values (one host read); returns its rows."""
        rows = []
        for (setup, m), vs in sorted(self._values.items()):
            v = torch.cat(vs)
            q = torch.quantile(v, torch.tensor([0.025, 0.975], dtype=v.dtype, device=v.device))
            s = torch.stack([v.mean(), v.std(correction=0), q[0], q[1]]).tolist()
            rows.append({"epoch": epoch, "setup": setup, "measure": m, "mean": s[0],
                         "std": s[1], "p2_5": s[2], "p97_5": s[3], "n": int(v.numel())})
        self._values = {}
        self.rows.extend(rows)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "rows": list(self.rows)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.steps = int(sd["steps"])
        self.rows = list(sd["rows"])
        self._values = {}
