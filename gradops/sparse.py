"""Sparse training masks: per-neuron top-K selection (PSN) and the paper's baselines
(docs/methods.md#sparse-training).

Sparse training (the ST paper, Sec. 3.2-3.4) trains only a fixed subset of the shared encoder's
parameters, chosen once before training: for every Linear/Conv weight ``W`` viewed as ``[out, F]``
(``F`` = fan-in; a conv ``[out, in/groups, kh, kw]`` has ``F = in/groups * kh * kw``), each row
(output neuron) keeps its ``K = min(k, F)`` input connections of largest ``|W|`` ("parameter
selection per neuron", PSN). :func:`psn_masks` computes these masks for a module and says what
fraction of the module's parameters they leave trainable; the optimizers in :mod:`gradops.optim`
(``SparseTraining``, ``SparseAdamW``) keep everything outside the masks bit-identical.

Example::

    encoder = timm.create_model("vit_base_patch16_224", num_classes=0)
    masks = gradops.sparse.psn_masks(encoder, k=300)        # or fraction=0.3
    print(masks.summary())                                  # per-layer and total fractions
    opt = gradops.optim.SparseTraining(torch.optim.AdamW(model.parameters()), masks, encoder)

Which parameter gets which mask (the first rule that matches wins)
------------------------------------------------------------------
Each parameter of ``module`` (``module.named_parameters()``, shared parameters once) falls under
exactly one rule; its *name* is the name in ``module.named_parameters()`` and its *owner* the
module holding it directly:

1. ``exclude`` matches the name -> ``"trainable"``: mask ``None`` (trained fully, never sparsified).
2. ``include`` matches the name -> ``"sparse"``: a per-row top-K mask over the parameter viewed as
   ``[shape[0], -1]`` (a 1-D parameter is ``[n, 1]`` and keeps everything).
3. ``frozen`` matches the name -> ``"frozen"``: mask all ``False``. Default
   :data:`DEFAULT_FROZEN`: position embeddings (names matching ``pos_embed``,
   ``position_embedding``, ``absolute_pos_embed``, ``relative_position_bias_table``) and
   class/distillation/register tokens (``cls_token``, ``dist_token``, ``reg_token``).
4. The owner is an instance of ``types`` (default :data:`SPARSE_TYPES`: ``nn.Linear``,
   ``nn.Conv1d/2d/3d`` and their subclasses) and the parameter is its ``weight``; or the owner is an
   ``nn.MultiheadAttention`` and the parameter is its ``in_proj_weight`` /
   ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` -> ``"sparse"``.
   **Fused qkv projections** (timm's ``attn.qkv = nn.Linear(d, 3d)``, torch's ``in_proj_weight``)
   are treated per output row like every Linear: each of the ``3d`` rows is one output neuron of
   q, k or v and keeps its own top-K of the ``d`` inputs, which is exactly what three separate
   q/k/v Linears would get. (The fraction of a fused layer equals that of the separate layers.)
5. The owner is a normalisation layer (``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.BatchNorm*``,
   ``nn.InstanceNorm*``, ``nn.RMSNorm``, ``nn.LocalResponseNorm``, or any class whose name contains
   ``Norm``, e.g. timm's ``LayerNorm2d``, ``RmsNorm``, ``BatchNormAct2d``) ->
   ``"frozen"`` if ``freeze_norm`` (default) else ``"trainable"``.
6. A bias (attribute ``bias``, ``*_bias``, ``bias_*``; e.g. Linear/Conv biases, MHA's
   ``in_proj_bias``, BEiT's ``q_bias``) -> ``"trainable"`` if ``train_bias`` (default) else
   ``"frozen"``.
7. Anything else (layer-scale ``gamma``, ConvNeXt's ``gamma``, ``nn.Embedding`` tables, transposed
   convolutions, custom parameters) -> ``other``: ``"trainable"`` (default) or ``"frozen"``.

These defaults are the paper's code conventions (docs/methods.md#sparse-training): biases trained
fully; normalisation
weights and biases, position embeddings and class tokens frozen. Pass the *shared encoder* as
``module``: heads/decoders are trained fully by not being masked at all (or pass the whole model
with ``exclude=[r"^head"]``). ``include`` / ``exclude`` / ``frozen`` take a regex string
(``re.search`` on the name), a callable ``fn(name, owner) -> bool``, or a list of these.

What the fractions count
------------------------
``kept`` of a parameter = its trainable entries (mask ``None``: all, ``"frozen"``: 0, sparse: the
number of ``True``). The total fraction is ``sum(kept) / denominator`` where, by default
(``denominator="all"``), the denominator is the number of entries of *all* parameters of
``module`` (each shared parameter once): frozen norms, position embeddings and tokens count in it,
and trained-fully biases count as trainable. ``denominator="sparse"`` counts only the sparsified
weights (numerator: their kept entries); an ``int`` gives a denominator of your own (e.g. the
whole model's size; numerator: all kept entries of ``module``).

With ``k=300`` on timm's ViT-B/16 encoder (``num_classes=0``: no head) these defaults give
29.37% of the encoder's 85.8M parameters (the paper's Tab. 4: 29.38%); see
``tests/test_sparse.py``.

The top-K op
------------
The per-row selection goes through :func:`_topk_mask` (one place), which calls the fused op
:func:`gradops.topk_mask` (same semantics as :func:`gradops.reference.topk_mask_reference`);
index tables are derived from masks (:func:`mask_indices`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Union

import torch
from torch import nn

from .ops.topk_mask import topk_mask

__all__ = ["DEFAULT_FROZEN", "METHODS", "NORM_TYPES", "SPARSE_TYPES", "LayerReport",
           "SparseMasks", "mask_indices", "psn_masks", "row_counts"]


# --- the one indirection to the top-K op ---------------------------------------------------------
def _topk_mask(W: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row top-``k`` magnitude mask of ``W`` viewed as ``[out, F]`` (ties: lower index).

    The single call site of the top-K op in gradops' sparse-training code."""
    return topk_mask(W, k)


def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """Column indices of the selected entries of a mask with the same count in every row.

    Args:
        mask: a bool mask, viewed as ``[out, F]``, with the same count ``K`` in every row.

    Returns:
        int32 ``[out, K]`` (int64 when ``F >= 2**31``), increasing along each row (the layout of
        ``gradops.topk_indices``).

    Raises:
        ValueError: when the rows hold different counts (use :func:`row_counts` to check first).
    """
    rows = mask.reshape(mask.shape[0], -1)
    counts = rows.sum(1)
    K = int(counts[0]) if rows.shape[0] else 0
    if rows.shape[0] and not bool((counts == K).all()):
        raise ValueError("mask_indices: the rows of the mask select different numbers of entries")
    cols = rows.nonzero()[:, 1]              # row-major: rows in order, columns increasing
    dtype = torch.int32 if rows.shape[1] < 2**31 else torch.int64
    return cols.to(dtype).reshape(rows.shape[0], K)


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """Selected entries per row of ``mask`` viewed as ``[out, F]``.

    Args:
        mask: a bool mask (dimension 0 the rows).

    Returns:
        int64 ``[out]``.
    """
    return mask.reshape(mask.shape[0], -1).sum(1)


# --- the rules -----------------------------------------------------------------------------------
SPARSE_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Module types whose ``weight`` is sparsified by default."""

NORM_TYPES: tuple[type, ...] = tuple(t for t in (
    nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm,
    getattr(nn, "RMSNorm", None)) if t is not None)
"""Normalisation layers (plus any class whose name contains ``Norm``)."""

DEFAULT_FROZEN: tuple[str, ...] = (
    r"pos_embed|position_embedding|absolute_pos_embed|relative_position_bias_table",
    r"cls_token|dist_token|reg_token",
)
"""Name patterns (``re.search``) of parameters frozen by default: position embeddings and tokens."""

METHODS = ("psn", "random", "global", "reverse")

_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

Matcher = Union[str, "re.Pattern[str]", Callable[[str, nn.Module], bool]]


def _matcher(spec: Matcher | Sequence[Matcher] | None, arg: str
             ) -> Callable[[str, nn.Module], bool]:
    if spec is None:
        return lambda name, owner: False
    items = [spec] if isinstance(spec, (str, re.Pattern)) or callable(spec) else list(spec)
    tests: list[Callable[[str, nn.Module], bool]] = []
    for it in items:
        if isinstance(it, str):
            rx = re.compile(it)
            tests.append(lambda name, owner, rx=rx: rx.search(name) is not None)
        elif isinstance(it, re.Pattern):
            tests.append(lambda name, owner, rx=it: rx.search(name) is not None)
        elif callable(it):
            tests.append(lambda name, owner, fn=it: bool(fn(name, owner)))
        else:
            raise TypeError(f"psn_masks: {arg} must be a regex string, a compiled pattern, a "
                            f"callable (name, module) -> bool or a list of these, got {it!r}")
    return lambda name, owner: any(t(name, owner) for t in tests)


def _is_norm(owner: nn.Module) -> bool:
    return isinstance(owner, NORM_TYPES) or "Norm" in type(owner).__name__


def _is_bias(attr: str) -> bool:
    return attr == "bias" or attr.endswith("_bias") or attr.startswith("bias_")


def _owned_parameters(module: nn.Module) -> Iterator[tuple[str, str, nn.Module, nn.Parameter]]:
    """(name, attribute, owner, parameter) for each parameter of ``module`` once, in the order of
    ``module.named_parameters()``."""
    owner_of: dict[int, tuple[nn.Module, str]] = {}
    for mod in module.modules():
        for attr, p in mod.named_parameters(recurse=False):
            owner_of.setdefault(id(p), (mod, attr))
    for name, p in module.named_parameters():
        mod, attr = owner_of[id(p)]
        yield name, attr, mod, p


# --- the result ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One parameter's line of :meth:`SparseMasks.report`.

    Attributes:
        name: the parameter's name in the module.
        shape: its shape.
        rule: ``"sparse"``, ``"frozen"`` or ``"trainable"``.
        kept: its trainable entries.
        total: its entries.
        k: the per-row K (sparse rules with the same count in every row), else None.
    """
    name: str
    shape: tuple[int, ...]
    rule: str          # "sparse", "frozen" or "trainable"
    kept: int          # trainable entries
    total: int         # entries
    k: int | None      # per-row K (sparse rules with the same count in every row), else None

    @property
    def fraction(self) -> float:
        return self.kept / self.total if self.total else 0.0


class SparseMasks(Mapping):
    """Masks of a module's parameters: ``name -> bool tensor`` (``True`` = trainable) or ``None``
    (trained fully). Built by :func:`psn_masks`; a read-only mapping over every parameter name.

    Attributes: ``k`` (the per-row K used), ``method``, ``target_fraction`` (when found from a
    fraction), ``rules`` (``name -> "sparse" | "frozen" | "trainable"``), ``denominator`` (the count
    the total fraction divides by) and ``denominator_desc`` (what it counts).

    Args:
        masks: ``name -> mask`` (bool, the parameter's shape) or None (trained fully), for every
            parameter.
        rules: ``name -> "sparse" | "frozen" | "trainable"``.
        shapes: ``name -> shape``.
        k: the per-row K used.
        method: the selection method (:data:`METHODS`).
        denominator: the count the total fraction divides by.
        denominator_desc: what it counts, in words.
        denominator_mode: ``"all"``, ``"sparse"`` (only the sparse rules' entries are counted as
            kept) or ``"given"``.
        target_fraction: the fraction ``k`` was found from, or None.
    """

    def __init__(self, masks: dict[str, torch.Tensor | None], rules: dict[str, str],
                 shapes: dict[str, tuple[int, ...]], *, k: int, method: str,
                 denominator: int, denominator_desc: str, denominator_mode: str,
                 target_fraction: float | None = None):
        self._masks = dict(masks)
        self.rules = dict(rules)
        self._shapes = dict(shapes)
        self.k = k
        self.method = method
        self.denominator = int(denominator)
        self.denominator_desc = denominator_desc
        self._denominator_mode = denominator_mode
        self.target_fraction = target_fraction
        self._kept = {n: self._count(n) for n in self._masks}

    # mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor | None:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return (f"SparseMasks(method={self.method!r}, k={self.k}, {len(self)} parameters, "
                f"fraction={self.fraction:.4f} of {self.denominator:,} ({self.denominator_desc}))")

    def _count(self, name: str) -> int:
        m, numel = self._masks[name], math.prod(self._shapes[name])
        if m is None:
            return numel
        return int(m.sum())

    @property
    def kept(self) -> int:
        """Trainable entries counted in the numerator of :attr:`fraction`."""
        if self._denominator_mode == "sparse":
            return sum(v for n, v in self._kept.items() if self.rules[n] == "sparse")
        return sum(self._kept.values())

    @property
    def fraction(self) -> float:
        """``kept / denominator`` (see the module docstring for what each counts)."""
        return self.kept / self.denominator if self.denominator else 0.0

    def report(self) -> dict:
        """Per-parameter lines and the total: ``{"layers": [LayerReport, ...], "kept", "total",
        "fraction", "k", "method", "target_fraction", "denominator"}`` (``denominator``
        says in words what ``total`` counts)."""
        layers = []
        for n, m in self._masks.items():
            k = None
            if self.rules[n] == "sparse" and m is not None:
                c = row_counts(m)
                if c.numel() and bool((c == c[0]).all()):
                    k = int(c[0])
            layers.append(LayerReport(n, self._shapes[n], self.rules[n], self._kept[n],
                                      math.prod(self._shapes[n]), k))
        return {"layers": layers, "kept": self.kept, "total": self.denominator,
                "fraction": self.fraction, "k": self.k, "method": self.method,
                "target_fraction": self.target_fraction, "denominator": self.denominator_desc}

    def summary(self, max_rows: int | None = None) -> str:
        """:meth:`report` as a text table.

        Args:
            max_rows: print only the first ``max_rows`` parameters (None: all).

        Returns:
            The table, lines joined by newlines, with the total on the last line.
        """
        r = self.report()
        rows = r["layers"] if max_rows is None else r["layers"][:max_rows]
        w = max([len(x.name) for x in rows] + [9])
        out = [f"{'parameter':<{w}}  {'rule':<9}  {'shape':<20}  {'kept':>12}  {'total':>12}  "
               f"{'fraction':>8}"]
        for x in rows:
            out.append(f"{x.name:<{w}}  {x.rule:<9}  {str(list(x.shape)):<20}  {x.kept:>12,}  "
                       f"{x.total:>12,}  {x.fraction:>8.4f}")
        if max_rows is not None and len(r["layers"]) > max_rows:
            out.append(f"... {len(r['layers']) - max_rows} more")
        target = (f", target {r['target_fraction']:.4f}" if r["target_fraction"] is not None
                  else "")
        out.append(f"total: {r['kept']:,} / {r['total']:,} = {r['fraction']:.4f} trainable "
                   f"(method {r['method']}, k = {r['k']}{target}; denominator: {r['denominator']})")
        return "\n".join(out)

    def for_params(self, module: nn.Module, *, include_trainable: bool = False
                   ) -> dict[torch.Tensor, torch.Tensor | None]:
        """``{parameter: mask}`` for ``module``'s parameters with a mask (frozen and sparse ones),
        keyed by the parameter objects, to hand to :class:`gradops.optim.SparseTraining` or
        :class:`gradops.optim.SparseAdamW`. Parameters left out are trained fully
        (``include_trainable=True`` lists them too, with ``None``). ``module`` must be the module
        the masks were computed for (or one with the same parameter names and shapes).

        Args:
            module: the module the masks were computed for.
            include_trainable: also list the fully trained parameters (with ``None``).

        Returns:
            ``{parameter: mask or None}``, masks on their parameter's device.

        Raises:
            KeyError: for a masked name ``module`` has no parameter of.
            ValueError: for a parameter whose shape differs from its mask's.
        """
        params = dict(module.named_parameters())
        out: dict[torch.Tensor, torch.Tensor | None] = {}
        for n, m in self._masks.items():
            if n not in params:
                raise KeyError(f"SparseMasks.for_params: module has no parameter {n!r}")
            p = params[n]
            if tuple(p.shape) != self._shapes[n]:
                raise ValueError(f"SparseMasks.for_params: {n!r} has shape {tuple(p.shape)}, the "
                                 f"mask {self._shapes[n]}")
            if m is None and not include_trainable:
                continue
            out[p] = None if m is None else (m if m.device == p.device else m.to(p.device))
        return out

    def to(self, device: torch.device | str) -> SparseMasks:
        """A copy with every mask on ``device``.

        Args:
            device: the destination device.

        Returns:
            A new :class:`SparseMasks`.
        """
        new = SparseMasks({n: None if m is None else m.to(device) for n, m in self._masks.items()},
                          self.rules, self._shapes, k=self.k, method=self.method,
                          denominator=self.denominator, denominator_desc=self.denominator_desc,
                          denominator_mode=self._denominator_mode,
                          target_fraction=self.target_fraction)
        return new


# --- selection methods ---------------------------------------------------------------------------
def _nan_as_inf(mag: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(mag), torch.full_like(mag, float("inf")), mag)


def _reverse_mask(W: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row ``min(k, F)`` entries of *smallest* ``|W|`` (ties: lower index; NaN counts as
    largest, so it is never taken before a number)."""
    rows = W.detach().reshape(W.shape[0], -1)
    K = min(k, rows.shape[1])
    mag = _nan_as_inf(rows.abs().to(torch.float32))
    order = torch.sort(mag, dim=1, stable=True).indices[:, :K]
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=W.device)
    mask.scatter_(1, order, True)
    return mask.reshape(W.shape)


def _random_mask(W: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Per-row ``min(k, F)`` positions drawn uniformly without replacement (from ``generator``)."""
    rows = W.reshape(W.shape[0], -1)
    dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(rows.shape, generator=generator, device=dev)
    # top-K of i.i.d. uniform keys = a uniformly random K-subset per row
    return _topk_mask(u, k).to(W.device).reshape(W.shape)


def _global_masks(weights: list[torch.Tensor], n_select: int) -> list[torch.Tensor]:
    """The ``n_select`` entries of largest ``|W|`` over all ``weights`` together (ties: earlier
    parameter, then lower flat index; NaN counts as largest)."""
    if not weights:
        return []
    dev = weights[0].device
    mag = torch.cat([_nan_as_inf(w.detach().reshape(-1).abs().to(torch.float32)).to(dev)
                     for w in weights])
    total = mag.numel()
    if n_select >= total:
        sel = torch.ones(total, dtype=torch.bool, device=dev)
    elif n_select <= 0:
        sel = torch.zeros(total, dtype=torch.bool, device=dev)
    else:
        thr = torch.kthvalue(mag, total - n_select + 1).values   # the n_select-th largest
        sel = mag > thr
        need = n_select - int(sel.sum())
        ties = mag == thr
        sel |= ties & (torch.cumsum(ties, 0) <= need)
    out, start = [], 0
    for w in weights:
        out.append(sel[start:start + w.numel()].reshape(w.shape).to(w.device))
        start += w.numel()
    return out


# --- the entry point -----------------------------------------------------------------------------
def psn_masks(module: nn.Module, k: int | None = None, fraction: float | None = None, *,
              include: Matcher | Sequence[Matcher] | None = None,
              exclude: Matcher | Sequence[Matcher] | None = None,
              frozen: Matcher | Sequence[Matcher] | None = DEFAULT_FROZEN,
              types: Sequence[type] = SPARSE_TYPES,
              freeze_norm: bool = True, train_bias: bool = True, other: str = "trainable",
              denominator: str | int = "all",
              method: str = "psn", generator: torch.Generator | None = None) -> SparseMasks:
    """Sparse-training masks for ``module``'s parameters (PSN, the ST paper's Sec. 3.4).

    Args:
        module: the shared encoder (its parameters are masked; heads outside it train fully).
        k: per-row (per output neuron) number of kept input connections, ``K = min(k, F)``.
        fraction: instead of ``k``, a target trainable fraction in ``[0, 1]``: the ``k`` in
            ``0..max F`` whose total fraction (as reported) is nearest is used (ties: smaller
            ``k``). Exactly one of ``k`` / ``fraction``. The search needs no masks: the count for
            a ``k`` is ``sum(out * min(k, F))`` over sparsified weights plus the trained-fully
            entries.
        include, exclude, frozen, types, freeze_norm, train_bias, other: the rules in the module
            docstring (``other``: ``"trainable"`` or ``"frozen"``).
        denominator: ``"all"`` (every parameter of ``module``), ``"sparse"`` (the sparsified
            weights only) or an ``int``.
        method: ``"psn"`` (per-row top-K of ``|W|``); the paper's ablation baselines, each with the
            same number of selected entries as PSN: ``"random"`` (the same count per row, at
            uniformly random positions drawn from ``generator``), ``"global"`` (the largest
            ``|W|`` over all sparsified weights of the module together; rows may get any count),
            ``"reverse"`` (per row the ``K`` entries of *smallest* ``|W|``).
        generator: random source for ``method="random"`` (its device is where the draws happen).

    Returns:
        :class:`SparseMasks` (``name -> mask or None``, ``.report()``, ``.summary()``,
        ``.for_params(module)``). Masks are bool tensors of the parameter's shape on its device.

    Raises:
        ValueError: naming the argument, for both or neither of ``k`` / ``fraction``, a ``k`` or
            ``fraction`` out of range, or an unknown ``method``, ``other`` or ``denominator``.
        TypeError: for a matcher (``include``, ``exclude``, ``frozen``) of another type.
    """
    if (k is None) == (fraction is None):
        raise ValueError("psn_masks: give exactly one of k= and fraction=")
    if method not in METHODS:
        raise ValueError(f"psn_masks: method must be one of {METHODS}, got {method!r}")
    if other not in ("trainable", "frozen"):
        raise ValueError(f"psn_masks: other must be 'trainable' or 'frozen', got {other!r}")
    if k is not None and (isinstance(k, bool) or int(k) != k or k < 0):
        raise ValueError(f"psn_masks: k must be a non-negative integer, got {k!r}")
    if fraction is not None and not (0.0 <= float(fraction) <= 1.0):
        raise ValueError(f"psn_masks: fraction must lie in [0, 1], got {fraction!r}")
    types = tuple(types)
    is_excluded = _matcher(exclude, "exclude")
    is_included = _matcher(include, "include")
    is_frozen = _matcher(frozen, "frozen")

    rules: dict[str, str] = {}
    params: dict[str, nn.Parameter] = {}
    for name, attr, owner, p in _owned_parameters(module):
        params[name] = p
        if is_excluded(name, owner):
            rule = "trainable"
        elif is_included(name, owner):
            rule = "sparse"
        elif is_frozen(name, owner):
            rule = "frozen"
        elif ((types and isinstance(owner, types) and attr == "weight")
              or (isinstance(owner, nn.MultiheadAttention) and attr in _MHA_WEIGHTS)):
            rule = "sparse"
        elif _is_norm(owner):
            rule = "frozen" if freeze_norm else "trainable"
        elif _is_bias(attr):
            rule = "trainable" if train_bias else "frozen"
        else:
            rule = other
        if rule == "sparse" and p.dim() == 0:
            rule = "trainable"      # a scalar has no rows to select in
        rules[name] = rule

    shapes = {n: tuple(p.shape) for n, p in params.items()}
    sparse_rows = [(p.shape[0], p.numel() // p.shape[0] if p.shape[0] else 0)
                   for n, p in params.items() if rules[n] == "sparse"]
    n_trainable = sum(p.numel() for n, p in params.items() if rules[n] == "trainable")
    n_sparse = sum(o * f for o, f in sparse_rows)
    if isinstance(denominator, str):
        if denominator == "all":
            denom = sum(p.numel() for p in params.values())
            desc = "all parameters of the module"
        elif denominator == "sparse":
            denom = n_sparse
            desc = "the sparsified weights of the module"
        else:
            raise ValueError(f"psn_masks: denominator must be 'all', 'sparse' or an int, got "
                             f"{denominator!r}")
        mode = denominator
    else:
        denom = int(denominator)
        if denom <= 0:
            raise ValueError(f"psn_masks: denominator must be positive, got {denominator!r}")
        desc = f"{denom:,} parameters (given)"
        mode = "given"

    def kept_for(kk: int) -> int:
        sel = sum(o * min(kk, f) for o, f in sparse_rows)
        return sel if mode == "sparse" else sel + n_trainable

    if fraction is not None:
        max_f = max((f for _, f in sparse_rows), default=0)
        target = float(fraction) * denom
        lo, hi = 0, max_f          # smallest kk with kept_for(kk) >= target, or max_f
        while lo < hi:
            mid = (lo + hi) // 2
            if kept_for(mid) >= target:
                hi = mid
            else:
                lo = mid + 1
        k = lo
        if lo > 0 and abs(kept_for(lo - 1) - target) <= abs(kept_for(lo) - target):
            k = lo - 1
    k = int(k)

    masks: dict[str, torch.Tensor | None] = {}
    sparse_names = [n for n in params if rules[n] == "sparse"]
    if method == "global":
        n_select = sum(o * min(k, f) for o, f in sparse_rows)
        glob = dict(zip(sparse_names, _global_masks([params[n] for n in sparse_names], n_select)))
    with torch.no_grad():
        for n, p in params.items():
            rule = rules[n]
            if rule == "trainable":
                masks[n] = None
            elif rule == "frozen":
                masks[n] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            elif k == 0 and method != "global":
                masks[n] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            elif method == "psn":
                masks[n] = _topk_mask(p.detach(), k).reshape(p.shape)
            elif method == "reverse":
                masks[n] = _reverse_mask(p, k)
            elif method == "random":
                masks[n] = _random_mask(p.detach(), k, generator)
            else:
                masks[n] = glob[n]
    return SparseMasks(masks, rules, shapes, k=k, method=method, denominator=denom,
                       denominator_desc=desc, denominator_mode=mode,
                       target_fraction=None if fraction is None else float(fraction))
