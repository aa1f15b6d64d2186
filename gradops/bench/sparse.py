"""``gradops bench --suite sparse``: one optimizer step over ViT-B/16's encoder at a trainable
fraction (PSN masks): ``gradops.optim.SparseAdamW`` vs dense AdamW (torch's default and fused)
vs AdamW inside ``SparseTraining``, time and state bytes."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import time
from collections.abc import Sequence

import torch

from .models import vit_b16_encoder
from .report import emit
from .timing import device_name, time_side_by_side


@dataclasses.dataclass
class SparseOptRow:
    impl: str
    params: int
    trainable: float        # trainable fraction of the encoder's parameters (psn_masks)
    dtype: str
    device: str
    ms: float               # median time of one optimizer step
    x_dense: float          # ms / ms of dense AdamW (torch's default implementation)
    state_mb: float         # optimizer state (moments, index tables, step counters)
    extra_mb: float         # kept beyond the optimizer state (SparseTraining: snapshot + masks)
    x_state: float          # (state + extra) / dense AdamW's state

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


SPARSE_DENSE = "AdamW (torch default)"


def sparse_optim_contenders(encoder: torch.nn.Module, masks, lr: float = 1e-4,
                            weight_decay: float = 0.05, only: Sequence[str] | None = None
                            ) -> dict[str, tuple]:
    """``{name: (optimizer, extra_bytes_fn)}``, each over its own copy of ``encoder`` with fixed
    random gradients: dense AdamW (torch's default and fused implementations), AdamW wrapped in
    :class:`gradops.optim.SparseTraining`, and :class:`gradops.optim.SparseAdamW` (same masks).
    ``only``: build just these."""
    import copy

    from ..optim import SparseAdamW, SparseTraining

    def copy_with_grads():
        enc = copy.deepcopy(encoder)
        g = torch.Generator(device="cpu").manual_seed(1)
        for p in enc.parameters():
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.device, p.dtype)
        return enc

    def sparse_training(enc):
        st = SparseTraining(torch.optim.AdamW(enc.parameters(), **kw), masks, enc)
        return st, lambda: sum(st.extra_bytes().values())

    kw = dict(lr=lr, weight_decay=weight_decay)
    factories = {
        SPARSE_DENSE: lambda enc: (torch.optim.AdamW(enc.parameters(), **kw), lambda: 0),
        "AdamW (torch fused=True)": lambda enc: (
            torch.optim.AdamW(enc.parameters(), fused=True, **kw), lambda: 0),
        "SparseTraining(AdamW): dense AdamW + restore": sparse_training,
        "gradops SparseAdamW": lambda enc: (
            SparseAdamW(enc.parameters(), masks, module=enc, **kw), lambda: 0),
    }
    return {name: make(copy_with_grads()) for name, make in factories.items()
            if only is None or name in only}


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def bench_sparse_case(fraction: float, device: torch.device, rounds: int = 15,
                      budget_s: float = 20.0) -> tuple[list[SparseOptRow], list[str]]:
    """One optimizer step over ViT-B/16's encoder at ``fraction`` trainable (PSN masks):
    SparseAdamW vs dense AdamW (+ SparseTraining), time and state bytes. Returns rows and notes."""
    from ..sparse import psn_masks
    encoder, source = vit_b16_encoder(device)
    t0 = time.perf_counter()
    masks = psn_masks(encoder, fraction=fraction)
    t_masks = time.perf_counter() - t0
    contenders = sparse_optim_contenders(encoder, masks)
    del encoder
    secs = time_side_by_side({n: opt.step for n, (opt, _) in contenders.items()}, device, rounds,
                             budget_s)
    n_params = sum(p.numel() for p in contenders[SPARSE_DENSE][0].param_groups[0]["params"])
    dense_state = _state_bytes(contenders[SPARSE_DENSE][0])
    rows = []
    for name, (opt, extra) in contenders.items():
        state, more = _state_bytes(opt), extra()
        rows.append(SparseOptRow(impl=name, params=n_params, trainable=masks.fraction,
                                 dtype="float32", device=device_name(device), ms=secs[name] * 1e3,
                                 x_dense=secs[name] / secs[SPARSE_DENSE], state_mb=state / 2**20,
                                 extra_mb=more / 2**20, x_state=(state + more) / dense_state))
    notes = [f"model: {source}, {n_params:,} parameters",
             f"masks: psn_masks(fraction={fraction}) -> k = {masks.k}, trainable "
             f"{masks.fraction:.4f} of {masks.denominator_desc} ({t_masks:.1f} s to compute)",
             "gradients: fixed random; AdamW lr 1e-4, weight decay 0.05; median of "
             f"up to {rounds} interleaved steps per optimizer"]
    return rows, notes


def format_sparse_rows(rows: Sequence[SparseOptRow]) -> str:
    """A Markdown table of sparse-optimizer benchmark rows."""
    head = ("| optimizer | params | trainable | device | ms / step | x dense AdamW | state MB | "
            "extra MB | x dense state |\n|---|---:|---:|---|---:|---:|---:|---:|---:|")
    body = [f"| {r.impl} | {r.params:,} | {r.trainable:.3f} | {r.device} | {r.ms:.1f} | "
            f"{r.x_dense:.2f} | {r.state_mb:.1f} | {r.extra_mb:.1f} | {r.x_state:.2f} |"
            for r in rows]
    return "\n".join([head, *body])



def main(args: argparse.Namespace) -> int:
    from .._backend import use_backend
    device = torch.device(args.device)
    print(f"gradops bench --suite sparse: device {device_name(device)}, fp32, "
          f"trainable fraction {args.fraction}, {datetime.date.today()}", flush=True)
    with use_backend(args.backend):
        rows, notes = bench_sparse_case(args.fraction, device, rounds=args.rounds,
                                        budget_s=args.budget)
    return emit(format_sparse_rows(rows), notes, rows, args.csv, device, args.append)
