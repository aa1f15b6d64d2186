"""The implementations gradops is measured against: Python pair loops with a host sync per pair
(LibMTL, Recon), plain matmuls, the torch formula of GradDrop, TorchJD's aggregators, and the
top-K selections of the sparse-training paper's code."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..reference import graddrop_reference
from ..weighting import create_method


# --- the peers ---------------------------------------------------------------------------------
def one_read(J: torch.Tensor) -> torch.Tensor:
    """The memory floor of any one-pass op: read every element of ``J`` once, as a flat reduction
    over contiguous memory (the fastest read torch offers; ``J.sum(0)``, the column sum, is
    much slower on CPU for small and large T and would flatter the ratios)."""
    return J.reshape(-1).sum()


def column_sum(J: torch.Tensor) -> torch.Tensor:
    """``J.sum(0)``: a one-pass column reduction; the floor is the faster of this and
    :func:`one_read`."""
    return J.sum(0)


FLOOR = "one read (flat J.sum())"


def matmul_gram(J: torch.Tensor) -> torch.Tensor:
    """``J @ J.T`` in fp32 (what TorchJD's Gramian-based aggregators compute)."""
    X = J if J.dtype == torch.float32 else J.float()
    return X @ X.T


def pair_loop_gram(J: torch.Tensor) -> torch.Tensor:
    """A Python loop over task pairs, one dot product and one host sync per pair (LibMTL/Recon)."""
    T = J.shape[0]
    G = torch.empty(T, T)
    for i in range(T):
        for j in range(i, T):
            G[i, j] = G[j, i] = float(torch.dot(J[i].float(), J[j].float()))
    return G


def segment_matmul_loop(J: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One matmul per segment (the obvious vectorised per-layer Gram)."""
    bounds = offsets.tolist()
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        X = J[:, a:b].float()
        out.append(X @ X.T)
    return torch.stack(out)


def segment_pair_loop(J: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Recon's per-layer statistics: for each layer, a Python loop over task pairs with a host
    sync per pair and layer."""
    bounds = offsets.tolist()
    T = J.shape[0]
    out = torch.empty(len(bounds) - 1, T, T)
    for l, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        X = J[:, a:b].float()
        for i in range(T):
            for j in range(i, T):
                out[l, i, j] = out[l, j, i] = float(torch.dot(X[i], X[j]))
    return out


def torchjd_aggregators() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """TorchJD's PCGrad and GradDrop aggregators, if torchjd is installed (else empty)."""
    try:
        from torchjd import aggregation
    except ImportError:
        return {}
    return {"pcgrad": aggregation.PCGrad(), "graddrop": aggregation.GradDrop()}


def torch_graddrop(J: torch.Tensor) -> torch.Tensor:
    """GradDrop written as plain torch ops (several full-size temporaries)."""
    noise = torch.rand(J.shape[1], device=J.device)
    return graddrop_reference(J, torch.zeros(J.shape[0], device=J.device), noise)[0]


def torch_topk_masks(weights: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """A loop of ``torch.topk(|W|, K, dim=1)`` + scatter per weight (torch.topk does not promise
    which of equal magnitudes it returns)."""
    out = []
    for w in weights:
        rows = w.reshape(w.shape[0], -1)
        idx = torch.topk(rows.abs(), min(k, rows.shape[1]), dim=1).indices
        out.append(torch.zeros(rows.shape, dtype=torch.bool, device=w.device)
                   .scatter_(1, idx, True).reshape(w.shape))
    return out


def argsort_masks(weights: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """A full (stable, descending) per-row ``torch.argsort`` of ``|W|`` per weight, first ``K``
    columns kept: the paper's numpy ``argsort`` selection, vectorised over the rows of a weight."""
    out = []
    for w in weights:
        rows = w.reshape(w.shape[0], -1)
        idx = torch.argsort(rows.abs(), dim=1, descending=True, stable=True)[:, :k]
        out.append(torch.zeros(rows.shape, dtype=torch.bool, device=w.device)
                   .scatter_(1, idx, True).reshape(w.shape))
    return out


def numpy_row_loop_masks(weights: Sequence[torch.Tensor], k: int) -> list:
    """The ST paper's code as published: a Python loop over the rows of each weight, one numpy
    ``argsort`` per row (on the host)."""
    import numpy as np
    out = []
    for w in weights:
        rows = w.reshape(w.shape[0], -1).float().cpu().numpy()
        mask = np.zeros(rows.shape, dtype=bool)
        for r in range(rows.shape[0]):
            mask[r, np.argsort(-np.abs(rows[r]))[:k]] = True
        out.append(mask.reshape(tuple(w.shape)))
    return out


def torchjd_aggregator(method: str, T: int) -> tuple[object | None, str]:
    """TorchJD's aggregator for ``method`` and its label, or ``(None, why)`` when TorchJD is not
    installed, has no such method, or the aggregator's optional dependencies are missing (checked
    by aggregating a small random Jacobian)."""
    try:
        import torchjd  # noqa: F401
    except ImportError:
        return None, "torchjd not installed"
    m = create_method(method, who="torchjd_aggregator")
    label = m.display
    try:
        agg = m.torchjd(T)
        if agg is None:
            return None, "no TorchJD counterpart"
        label = type(agg).__name__
        agg(torch.randn(T, 5, generator=torch.Generator().manual_seed(0)))
        if hasattr(agg, "reset"):
            agg.reset()
    except Exception as exc:  # ImportError of cvxpy & co., raised by the aggregator
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"TorchJD {label} skipped: {msg}"
    return agg, label
