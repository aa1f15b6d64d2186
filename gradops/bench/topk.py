"""``gradops bench --suite topk``: per-neuron top-K masks (sparse training's selection, the ST
paper's Sec. 3.4) of every Linear/Conv weight of ViT-B/16's encoder: ``gradops.topk_mask`` vs a
``torch.topk`` loop vs per-row argsort (and the paper's numpy row loop)."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
from collections.abc import Callable, Sequence

import torch

from ..ops.topk_mask import topk_mask
from .models import vit_b16_weights
from .peers import argsort_masks, numpy_row_loop_masks, torch_topk_masks
from .report import emit
from .timing import device_name, time_side_by_side


def topk_mask_all(weights: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """gradops: one ``topk_mask`` call per weight."""
    return [topk_mask(w, k) for w in weights]


@dataclasses.dataclass
class TopkRow:
    impl: str
    weights: int
    entries: int
    k: int
    dtype: str
    device: str
    ms: float
    gbps: float
    x_read: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


TOPK_FLOOR = "one read of every weight (W.sum() per weight)"


def bench_topk_case(k: int, dtype: torch.dtype, device: torch.device, rounds: int = 15,
                    budget_s: float = 20.0, paper_loop: bool = True
                    ) -> tuple[list[TopkRow], list[str]]:
    """Time the top-``k`` masks of all ViT-B/16 encoder weights: gradops vs a ``torch.topk`` loop
    vs per-row argsort (vectorised per weight; and the paper's numpy per-row loop when
    ``paper_loop``). Returns the rows and notes (weight source, agreement of the results)."""
    weights, source = vit_b16_weights(device, dtype)
    fns: dict[str, Callable[[], object]] = {
        TOPK_FLOOR: lambda: [w.sum() for w in weights],
        "gradops.topk_mask": lambda: topk_mask_all(weights, k),
        "torch.topk + scatter, per weight": lambda: torch_topk_masks(weights, k),
        "torch.argsort per row (stable), per weight": lambda: argsort_masks(weights, k),
    }
    if paper_loop:
        fns["numpy argsort, Python loop over rows (the paper's code)"] = \
            lambda: numpy_row_loop_masks(weights, k)
    ours = topk_mask_all(weights, k)
    same_sort = all(torch.equal(a, b) for a, b in zip(ours, argsort_masks(weights, k)))
    same_topk = sum(not torch.equal(a, b) for a, b in zip(ours, torch_topk_masks(weights, k)))
    notes = [f"weights: {len(weights)} tensors, {sum(w.numel() for w in weights):,} entries, "
             f"from {source}",
             f"gradops.topk_mask == stable per-row argsort on every weight: {same_sort}; "
             f"weights where torch.topk's mask differs: {same_topk}"]
    secs = time_side_by_side(fns, device, rounds, budget_s)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    floor = secs[TOPK_FLOOR]
    rows = [TopkRow(impl=name, weights=len(weights), entries=sum(w.numel() for w in weights), k=k,
                    dtype=str(dtype).replace("torch.", ""), device=device_name(device),
                    ms=s * 1e3, gbps=nbytes / s / 1e9, x_read=s / floor)
            for name, s in secs.items()]
    return rows, notes


def format_topk_rows(rows: Sequence[TopkRow]) -> str:
    """A Markdown table of top-K benchmark rows."""
    head = ("| implementation | weights | entries | k | dtype | ms | GB/s of W | x one read |\n"
            "|---|---:|---:|---:|---|---:|---:|---:|")
    body = [f"| {r.impl} | {r.weights} | {r.entries:,} | {r.k} | {r.dtype} | {r.ms:.1f} | "
            f"{r.gbps:.2f} | {r.x_read:.1f} |" for r in rows]
    return "\n".join([head, *body])



def main(args: argparse.Namespace) -> int:
    from .._backend import use_backend
    from .gram import DTYPES
    device = torch.device(args.device)
    print(f"gradops bench --suite topk: device {device_name(device)}, "
          f"dtype {args.dtype}, k = {args.k}, {datetime.date.today()}", flush=True)
    with use_backend(args.backend):
        rows, notes = bench_topk_case(args.k, DTYPES[args.dtype], device, rounds=args.rounds,
                                      budget_s=args.budget, paper_loop=not args.no_pair_loops)
    return emit(format_topk_rows(rows), notes, rows, args.csv, device, args.append)
