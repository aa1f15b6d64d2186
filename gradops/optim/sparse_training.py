"""``SparseTraining``: any torch optimizer, with entries outside a mask held bit-identical.

Sparse training (docs/methods.md#sparse-training; the ST paper, Sec. 3.2) updates ``theta <- theta
- lr * M (.) update``.
The paper's code kept unselected entries fixed only because its weight decay was 0 and its
gradients were masked; with momentum, Adam's moments, AdamW's decoupled weight decay, gradient
clipping or AMP, zero gradients are not enough (AdamW decays a weight whose gradient is 0;
momentum keeps moving it). :class:`SparseTraining` does not rely on zero gradients:

1. **Snapshot** (at wrap time), per parameter with a mask that is not all ``True``:
   ``snapshot="full"`` (default): a copy of the parameter and the index table of its *selected*
   entries (:func:`index_layout`: int32 ``[out, K]``, the layout of ``gradops.topk_indices``);
   ``snapshot="packed"``: the frozen entries' values packed (``p[~mask]``) and a bool mask of
   them. A fully frozen parameter keeps a copy only. Parameters whose mask is ``None`` or all
   ``True`` store nothing.
2. **Restore** (after every ``inner.step()``), which is what the guarantee rests on: ``"full"``:
   gather the selected entries' new values, copy the snapshot back, scatter them in (three
   passes, all index based); ``"packed"``: one ``p.masked_scatter_(~mask, snapshot)``; fully
   frozen: ``p.copy_(snapshot)``. Whatever the inner optimizer did to the frozen entries (weight
   decay, momentum, a bias-corrected Adam step on stale moments) is undone bit-exactly on every
   step, so they stay equal to their values at wrap time.
3. **Gradient masking** (so that the inner optimizer's state of frozen entries stays zero, and
   clipping, ``GradScaler``'s inf check and gradient statistics see only the trainable
   coordinates, the paper's coordinate projection): with ``grad_hooks=True`` (default) a
   post-accumulate-grad hook on each masked parameter sets the frozen entries of ``p.grad`` to 0
   (gather the selected entries, zero, scatter back; or ``masked_fill_``; an inf/NaN there is
   removed too) as soon as backward has accumulated into it, i.e. *before* ``clip_grad_norm_`` /
   ``GradScaler.unscale_``; with ``mask_grads=True`` (default) ``step()`` masks them again first,
   which covers gradients written directly into ``.grad`` (hooks do not fire then).

Memory (see :meth:`SparseTraining.extra_bytes`), per masked parameter of ``n`` entries of which a
fraction ``f`` is selected: ``"full"``: ``n * itemsize + 4 * f * n`` bytes (fp32 at ``f = 0.3``:
1.3x the parameter); ``"packed"``: ``(1 - f) * n * itemsize + n`` bytes (0.95x). The index-based
``"full"`` restore is 2-3x faster on CPU than ``masked_scatter_`` / ``masked_fill_`` (bool-mask
kernels); on a GPU both are memory-bound. The inner optimizer's state is the inner optimizer's
(dense); for compact Adam state use :class:`gradops.optim.SparseAdamW`.

The wrapper is a real :class:`torch.optim.Optimizer`: ``param_groups``, ``state`` and ``defaults``
*are* the inner optimizer's objects (properties forwarding to them), so LR schedulers,
``GradScaler`` (``scaler.step(opt)``, ``scaler.unscale_(opt)``), ``clip_grad_norm_`` and step hooks
work on it as on the inner optimizer.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ._wrapper import OptimizerWrapper

__all__ = ["SparseTraining", "index_layout", "mask_checksum", "resolve_masks"]


def resolve_masks(masks: Any, module: nn.Module | None, where: str
                  ) -> dict[torch.Tensor, torch.Tensor | None]:
    """Normalise ``masks`` to ``{parameter: bool mask or None}``.

    Accepts a :class:`gradops.sparse.SparseMasks` (with ``module``), a mapping from parameter names
    to masks (with ``module``), or a mapping from parameters to masks. Masks must be bool tensors
    of their parameter's shape; they are moved to the parameter's device."""
    from ..sparse import SparseMasks
    if isinstance(masks, SparseMasks):
        if module is None:
            raise ValueError(f"{where}: masks is a SparseMasks (keyed by parameter name); pass the "
                             f"module it was computed for as module=, or masks.for_params(module)")
        masks = masks.for_params(module)
    if not isinstance(masks, Mapping):
        raise TypeError(f"{where}: masks must be a SparseMasks or a mapping parameter -> bool "
                        f"mask, got {type(masks).__name__}")
    named = dict(module.named_parameters()) if module is not None else {}
    out: dict[torch.Tensor, torch.Tensor | None] = {}
    for key, m in masks.items():
        if isinstance(key, str):
            if key not in named:
                raise KeyError(f"{where}: masks names {key!r}, which is no parameter of module")
            p = named[key]
        elif isinstance(key, torch.Tensor):
            p = key
        else:
            raise TypeError(f"{where}: mask keys must be parameters (or names with module=), got "
                            f"{type(key).__name__}")
        if m is not None:
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError(f"{where}: a mask must be a bool tensor, got "
                                f"{getattr(m, 'dtype', type(m).__name__)}")
            if m.shape != p.shape:
                raise ValueError(f"{where}: mask of shape {tuple(m.shape)} for a parameter of "
                                 f"shape {tuple(p.shape)}")
            if m.device != p.device:
                m = m.to(p.device)
        out[p] = m
    return out


def mask_checksum(mask: torch.Tensor) -> str:
    """SHA-256 of a bool mask's row-major bytes (shape and contents)."""
    h = hashlib.sha256(str(tuple(mask.shape)).encode())
    h.update(mask.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def index_layout(mask: torch.Tensor) -> torch.Tensor:
    """The selected entries of ``mask`` as an index table ``[R, K]`` over the parameter viewed as
    ``[R, numel / R]``: ``R = shape[0]`` when every row of ``mask`` viewed as ``[out, F]`` selects
    the same number ``K`` (PSN and random masks), else ``R = 1`` (one row over the flattened
    parameter). int32 (int64 when a row is ``>= 2**31`` long), columns increasing."""
    from ..sparse import mask_indices, row_counts
    rows = mask.reshape(mask.shape[0], -1) if mask.dim() else mask.reshape(1, 1)
    counts = row_counts(rows)
    if rows.shape[0] and bool((counts == counts[0]).all()):
        return mask_indices(rows).contiguous()
    return mask_indices(rows.reshape(1, -1)).contiguous()


class _Frozen:
    """What is kept for one masked parameter, and how its frozen entries are restored.

    ``mode``: ``"all"`` (fully frozen: a copy, restored with ``copy_``), ``"full"`` (a copy of the
    parameter and the index table of the *selected* entries: restore = gather the selected
    entries, copy the snapshot back, scatter them in), ``"packed"`` (the frozen entries' values
    packed, and a bool mask of them: restore = ``masked_scatter_``)."""
    __slots__ = ("mode", "values", "idx", "shape", "_frozen", "checksum", "mask")

    def __init__(self, p: torch.Tensor, mask: torch.Tensor, keep_mask: bool, snapshot: str):
        self.shape = tuple(p.shape)
        self.idx = self._frozen = None
        with torch.no_grad():
            if not bool(mask.any()):
                self.mode = "all"
                self.values = p.detach().clone()
            elif snapshot == "full" and p.is_contiguous():
                self.mode = "full"
                self.values = p.detach().clone()
                self.idx = index_layout(mask)
            else:
                self.mode = "packed"
                self._frozen = ~mask
                self.values = p.detach().masked_select(self._frozen)
        self.checksum = mask_checksum(mask)
        self.mask = mask if keep_mask else None

    @property
    def frozen(self) -> torch.Tensor | None:
        """Bool mask of the frozen entries (``None`` when all are frozen)."""
        if self.mode == "all":
            return None
        if self.mode == "packed":
            return self._frozen
        R = self.idx.shape[0]
        out = torch.ones(R, math.prod(self.shape) // R, dtype=torch.bool, device=self.idx.device)
        return out.scatter_(1, self.idx.long(), False).reshape(self.shape)

    def n_frozen(self) -> int:
        if self.mode == "packed":
            return self.values.numel()
        return self.values.numel() - (0 if self.idx is None else self.idx.numel())

    def restore(self, p: torch.Tensor) -> None:
        if self.mode == "all":
            p.copy_(self.values)
        elif self.mode == "packed":
            p.masked_scatter_(self._frozen, self.values)
        else:
            i = self.idx.long()
            rows = p.view(i.shape[0], -1)
            new = rows.gather(1, i)
            p.copy_(self.values)
            rows.scatter_(1, i, new)

    def mask_grad(self, g: torch.Tensor) -> None:
        if self.mode == "all":
            g.zero_()
        elif self.mode == "full" and g.is_contiguous() and g.shape == self.shape:
            i = self.idx.long()
            rows = g.view(i.shape[0], -1)
            keep = rows.gather(1, i)
            g.zero_()
            rows.scatter_(1, i, keep)
        else:
            g.masked_fill_(self.frozen, 0)

    def nbytes(self) -> tuple[int, int]:
        """(snapshot bytes, index-table or mask bytes)."""
        snap = self.values.numel() * self.values.element_size()
        if self.mode == "full":
            return snap, self.idx.numel() * self.idx.element_size()
        if self.mode == "packed":
            return snap, self._frozen.numel()
        return snap, 0


class SparseTraining(OptimizerWrapper):
    """Wrap ``optimizer`` so that only the entries selected by ``masks`` ever change.

    Args:
        optimizer: any :class:`torch.optim.Optimizer` (SGD with momentum/Nesterov, Adam, AdamW,
            ...), over all parameters (masked or not).
        masks: ``{parameter: bool mask}`` (``True`` = trainable; ``None`` = trained fully), e.g.
            ``SparseMasks.for_params(module)``; or a :class:`gradops.sparse.SparseMasks` / a
            ``{name: mask}`` mapping together with ``module``. Parameters without a mask, or with
            an all-``True`` one, are left to the inner optimizer alone.
        module: the module the masks' names refer to (only with name-keyed masks).
        mask_grads: zero the frozen entries of ``.grad`` at the start of :meth:`step`.
        grad_hooks: also zero them as soon as backward accumulates into ``.grad`` (so
            ``clip_grad_norm_`` and ``GradScaler`` see masked gradients); :meth:`remove_hooks`
            removes the hooks.
        save_masks: put the masks themselves into :meth:`state_dict` (else a SHA-256 per mask).
        snapshot: ``"full"`` (a copy + index table; faster) or ``"packed"`` (frozen values + bool
            mask; less memory once more than 1/8 of an fp32 weight is selected), see the module
            docstring.

    Raises:
        TypeError: for an ``optimizer`` that is not a torch optimizer, or masks of the wrong type
            (keys, values).
        ValueError: for an unknown ``snapshot``, name-keyed masks without ``module``, or a mask
            whose shape is not its parameter's.
        KeyError: for a mask name that is no parameter of ``module``.

    Guarantee: entries outside the masks stay bit-identical to their values when the wrapper was
    made (see the module docstring for how, and what it stores).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, masks: Any,
                 module: nn.Module | None = None, *, mask_grads: bool = True,
                 grad_hooks: bool = True, save_masks: bool = False, snapshot: str = "full"):
        super().__init__(optimizer, "SparseTraining")
        if snapshot not in ("full", "packed"):
            raise ValueError("SparseTraining: snapshot must be 'full' or 'packed', got "
                             f"{snapshot!r}")
        self.snapshot = snapshot
        self.mask_grads = mask_grads
        self.save_masks = save_masks
        self._grad_hooks = grad_hooks
        self._handles: list = []
        self._frozen: dict[torch.Tensor, _Frozen] = {}
        self._set_masks(resolve_masks(masks, module, "SparseTraining"))

    def __repr__(self) -> str:
        n = len(self._frozen)
        return f"SparseTraining({n} masked parameters, {self.optimizer!r})"

    # --- masks --------------------------------------------------------------------------------
    def _set_masks(self, pmasks: dict[torch.Tensor, torch.Tensor | None]) -> None:
        self.remove_hooks()
        self._frozen = {}
        for p in self._params():
            m = pmasks.get(p)
            if m is None or bool(m.all()):
                continue
            e = _Frozen(p, m, keep_mask=self.save_masks, snapshot=self.snapshot)
            self._frozen[p] = e
            if self._grad_hooks and p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(e)))

    @staticmethod
    def _make_hook(e: _Frozen) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                with torch.no_grad():
                    e.mask_grad(p.grad)
        return hook

    def remove_hooks(self) -> None:
        """Remove the gradient hooks (gradients are then masked only in :meth:`step`)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def trainable_mask(self, p: torch.Tensor) -> torch.Tensor | None:
        """The bool mask of ``p``'s trainable entries (None when ``p`` is trained fully).

        Args:
            p: one of the wrapped optimizer's parameters.

        Returns:
            A bool tensor of ``p``'s shape, or None.
        """
        e = self._frozen.get(p)
        if e is None:
            return None
        if e.mode == "all":
            return torch.zeros(e.shape, dtype=torch.bool, device=p.device)
        return ~e.frozen

    def masked_parameters(self) -> list[torch.Tensor]:
        """The parameters with frozen entries (what :meth:`step` restores)."""
        return list(self._frozen)

    def extra_bytes(self) -> dict[str, int]:
        """Bytes this wrapper keeps beyond the inner optimizer: ``{"snapshot": the copies of the
        masked parameters (``snapshot="full"``) or their packed frozen values (``"packed"``),
        "masks": the index tables of the selected entries (``"full"``) or the bool masks of the
        frozen entries (``"packed"``)}``."""
        snap = masks = 0
        for e in self._frozen.values():
            s, m = e.nbytes()
            snap, masks = snap + s, masks + m
        return {"snapshot": snap, "masks": masks}

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the frozen entries of every masked parameter's ``.grad``."""
        for p, e in self._frozen.items():
            if p.grad is not None:
                e.mask_grad(p.grad)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the snapshot back into the frozen entries (done after every step)."""
        for p, e in self._frozen.items():
            e.restore(p)

    # --- the optimizer interface --------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """``inner.step(closure)`` between gradient masking and the restore of frozen entries.

        Args:
            closure: re-evaluates the model and returns the loss (as for any torch optimizer),
                or None.

        Returns:
            The inner optimizer's return value.
        """
        if self.mask_grads:
            self.mask_gradients()
        if closure is None:
            loss = self.optimizer.step()
        else:
            def masked_closure():
                out = closure()
                if self.mask_grads:
                    self.mask_gradients()
                return out
            loss = self.optimizer.step(masked_closure)
        self.restore()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``"sparse_training"``: per masked parameter (by
        its index in the inner state dict's numbering) the SHA-256 of its mask, its trainable
        count, and the mask itself when ``save_masks``."""
        sd = self.optimizer.state_dict()
        index = {p: i for i, p in enumerate(self._params())}
        info = {}
        for p, e in self._frozen.items():
            entry: dict[str, Any] = {"sha256": e.checksum, "numel": p.numel(),
                                     "frozen": e.n_frozen()}
            if self.save_masks:
                entry["mask"] = e.mask.clone()
            info[index[p]] = entry
        sd = dict(sd)
        sd["sparse_training"] = {"masks": info}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the inner optimizer's state. The masks recorded in ``state_dict`` must match the
        wrapper's (checked by SHA-256), unless the state dict carries the masks themselves
        (``save_masks=True``): then they replace the wrapper's, with a fresh snapshot of the
        parameters' current values (load the model's weights first).

        Args:
            state_dict: a dict returned by :meth:`state_dict`.

        Raises:
            ValueError: when the recorded masks differ from the wrapper's and the state dict
                does not carry the masks.
        """
        sd = dict(state_dict)
        info = sd.pop("sparse_training", None)
        new_masks = None
        if info is not None:
            params = self._params()
            saved = info["masks"]
            have = {i: self._frozen[p].checksum for i, p in enumerate(params) if p in self._frozen}
            want = {int(i): e["sha256"] for i, e in saved.items()}
            if have != want:
                if all("mask" in e for e in saved.values()):
                    new_masks = {params[int(i)]: e["mask"] for i, e in saved.items()}
                else:
                    bad = sorted(set(have.items()) ^ set(want.items()))
                    raise ValueError(
                        "SparseTraining.load_state_dict: the masks in the state dict differ from "
                        f"this wrapper's (parameter indices {sorted({i for i, _ in bad})}); build "
                        "the wrapper with the same masks, or save with save_masks=True")
        self.optimizer.load_state_dict(sd)
        if new_masks is not None:
            self._set_masks(resolve_masks(new_masks, None, "SparseTraining.load_state_dict"))
