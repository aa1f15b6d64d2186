"""Euclidean projection onto the probability simplex, on the device (MoDo's and MoCo's weight
updates): sort-based, no host synchronisation, no Python branch on a tensor value."""
from __future__ import annotations

import torch

__all__ = ["project_simplex"]


def project_simplex(y: torch.Tensor) -> torch.Tensor:
    """``argmin_{l in Delta} ||l - y||`` for ``y [T]``, ``Delta = {l >= 0, sum l = 1}``.

    The sort-based projection (Held, Wolfe & Crowder 1974; Duchi et al., ICML 2008, Fig. 1):
    ``u = sort(y, descending)``, ``rho = max{j : u_j - (sum_{k <= j} u_k - 1) / j > 0}``,
    ``tau = (sum_{k <= rho} u_k - 1) / rho``, ``l = max(y - tau, 0)``. It is the projection of
    TorchJD's ``project_onto_simplex`` and LibMTL's ``MoDo._projection2simplex`` (whose loop stops
    at the first ``j`` where ``(sum_{k <= j} u_k - 1) / j > u_{j+1}``: the same ``tau``), written
    without their host-side loop. ``j = 1`` always qualifies, so ``rho >= 1``. A NaN/Inf in ``y``
    gives a non-finite result (``tau`` is then non-finite)."""
    T = y.shape[-1]
    u = torch.sort(y, dim=-1, descending=True).values
    css = torch.cumsum(u, dim=-1) - 1
    j = torch.arange(1, T + 1, dtype=y.dtype, device=y.device)
    ok = u * j > css                                   # u_j - css_j / j > 0, without a division
    rho = torch.clamp(ok.to(torch.int64).cumsum(-1).eq(torch.arange(1, T + 1, device=y.device))
                      .to(torch.int64).sum(-1, keepdim=True), min=1)
    tau = torch.gather(css, -1, rho - 1) / rho.to(y.dtype)
    # a non-finite y: the comparisons are False and tau could come out finite; make it NaN
    bad = ~torch.isfinite(y).all(-1, keepdim=True)
    tau = torch.where(bad, torch.full_like(tau, float("nan")), tau)
    return torch.clamp(y - tau, min=0.0)            # clamp keeps NaN
