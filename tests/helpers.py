"""Test helpers: inputs of every awkward shape and layout, and fp32-accumulation tolerances."""
from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_J(T: int, P: int, dtype=torch.float32, layout: str = "contiguous", seed: int = 0,
           zero_frac: float = 0.0) -> torch.Tensor:
    """A random ``[T, P]`` matrix (a fraction ``zero_frac`` of exact zeros) in a given layout:

    * ``contiguous``; ``row_view``: ``big[:, 3:3+P]`` (row stride > P, unaligned start);
    * ``every_other_row``: ``big[::2]`` (row stride 2P); ``col_strided``: ``big[:, ::2]``;
    * ``transposed``: ``X.T`` of a ``[P, T]`` tensor (column stride T).
    """
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(T, P, generator=g)
    if zero_frac:
        vals = vals.masked_fill(torch.rand(T, P, generator=g) < zero_frac, 0.0)
    return with_layout(vals.to(dtype), layout)


def with_layout(J: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``J`` with the memory layout named as in :func:`make_J`."""
    T, P = J.shape
    if layout == "contiguous":
        return J.contiguous()
    if layout == "row_view":
        big = torch.zeros(T, P + 7, dtype=J.dtype)
        big[:, 3:3 + P] = J
        return big[:, 3:3 + P]
    if layout == "every_other_row":
        big = torch.zeros(2 * T, P, dtype=J.dtype)
        big[::2] = J
        return big[::2]
    if layout == "col_strided":
        big = torch.zeros(T, 2 * P, dtype=J.dtype)
        big[:, ::2] = J
        return big[:, ::2]
    if layout == "transposed":
        return J.T.contiguous().T
    raise ValueError(f"unknown layout {layout!r}")


def gram64(J: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ground truth (per segment when ``offsets`` is given)."""
    X = J.double()
    if offsets is None:
        return X @ X.T
    o = offsets.tolist()
    return torch.stack([X[:, a:b] @ X[:, a:b].T for a, b in zip(o[:-1], o[1:])])


def abs_gram64(J: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    return gram64(J.abs(), offsets)


def assert_gram_close(G: torch.Tensor, J: torch.Tensor, offsets: torch.Tensor | None = None,
                      rel: float = 3e-5) -> None:
    """``|G - J J^T| <= rel * (|J| |J|^T) + tiny``: the error of fp32 accumulation scales with
    the sum of the absolute products, not with the (possibly cancelling) result."""
    assert G.dtype == torch.float32
    ref = gram64(J, offsets)
    bound = rel * abs_gram64(J, offsets) + 1e-30
    err = (G.double() - ref).abs()
    assert G.shape == ref.shape, (G.shape, ref.shape)
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert bool((err <= bound).all()), f"max error / bound = {worst:.3g}"


def random_offsets(P: int, L: int, seed: int = 0, empties: bool = True) -> torch.Tensor:
    """A random segment table of ``L`` segments over ``P`` columns (with empty ones if asked)."""
    g = torch.Generator().manual_seed(seed)
    cuts = (torch.randint(0, P + 1, (L - 1,), generator=g) if L > 1
            else torch.empty(0, dtype=torch.long))
    if empties and L > 2:
        cuts[0] = cuts[1]  # at least one empty segment (two equal cuts)
    inner = torch.sort(cuts).values
    return torch.cat([torch.tensor([0]), inner, torch.tensor([P])]).to(torch.int64)
