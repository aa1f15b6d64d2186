"""Quick benchmark of gradops' ops against the implementations people use today.

``gradops bench`` (and ``benchmarks/bench_gram.py`` for pytest-benchmark) time, side by side in
one run, interleaved round by round so that machine noise hits every contender alike:

* ``gram``: gradops vs ``J @ J.T`` (cuBLAS / MKL) vs a Python loop over task pairs with a host
  sync per pair (what Recon's and LibMTL's code do);
* ``segment_gram``: gradops vs a loop of per-segment matmuls vs Recon's per-layer pair loop;
* ``combine``: gradops vs ``w @ J``;
* ``pcgrad``: gradops (Gram pass + on-device recurrence + combine pass) vs the vector form with a
  host sync per pair (LibMTL, the paper) vs TorchJD's ``PCGrad`` aggregator (when installed);
* ``graddrop``: gradops (one fused pass) vs TorchJD's ``GradDrop`` aggregator (when installed) vs
  the plain torch formula;
* the memory floor: one read of ``J`` (a flat ``J.sum()``; ``J.sum(0)`` beside it);
* ``topk`` (``--suite topk``, its own table): per-neuron top-k masks of all ViT-B/16 encoder
  weights, gradops vs a ``torch.topk`` loop vs per-row argsort (and the paper's numpy row loop).
* ``sparse`` (``--suite sparse``, its own table): one optimizer step over ViT-B/16's encoder at 30%
  trainable (PSN masks), ``gradops.optim.SparseAdamW`` vs dense AdamW (torch's default and fused)
  vs AdamW inside ``SparseTraining``: time and state bytes.

Each row reports the median time, the bytes of ``J`` read per second, and the time as a multiple
of the one-read floor, the faster of a flat ``J.sum()`` and the column sum ``J.sum(0)`` measured in
the same run (quote ratios measured in one run, not absolute times).
"""
from __future__ import annotations

import csv
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .ops.combine import combine
from .ops.graddrop import graddrop
from .ops.gram import gram, segment_gram
from .ops.pcgrad import pcgrad, random_orders
from .ops.topk_mask import topk_mask
from .reference import graddrop_reference, pcgrad_reference
from .segments import offsets_from_numels


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


# --- timing ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    op: str
    impl: str
    T: int
    P: int
    L: int
    dtype: str
    device: str
    ms: float
    gbps: float
    x_read: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int,
                      budget_s: float = 20.0) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round.

    One warm-up call each first; stops early (with at least 3 rounds) when ``budget_s`` is spent.
    """
    for fn in fns.values():
        fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def equal_offsets(P: int, L: int) -> torch.Tensor:
    """``L`` segments of (nearly) equal size covering ``P`` columns."""
    base, extra = divmod(P, L)
    return offsets_from_numels([base + (1 if i < extra else 0) for i in range(L)])


def bench_case(T: int, P: int, L: int, dtype: torch.dtype, device: torch.device, rounds: int = 15,
               pair_loops: bool = True, budget_s: float = 20.0) -> list[Row]:
    """Time every contender for one shape; returns one :class:`Row` per (op, implementation)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    J = torch.randn(T, P, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    offsets = equal_offsets(P, L)
    fns: dict[str, Callable[[], object]] = {
        FLOOR: lambda: one_read(J),
        "column sum (J.sum(0))": lambda: column_sum(J),
        "gram: gradops": lambda: gram(J),
        "gram: J @ J.T": lambda: matmul_gram(J),
        "segment_gram: gradops": lambda: segment_gram(J, offsets),
        "segment_gram: matmul per segment": lambda: segment_matmul_loop(J, offsets),
    }
    if pair_loops:
        fns["gram: pair loop (LibMTL/Recon)"] = lambda: pair_loop_gram(J)
        fns["segment_gram: pair loop per layer (Recon)"] = lambda: segment_pair_loop(J, offsets)
    return _rows(fns, J, L, device, rounds, budget_s)


def bench_methods_case(T: int, P: int, dtype: torch.dtype, device: torch.device,
                       rounds: int = 15, vector_form: bool = True,
                       budget_s: float = 20.0) -> list[Row]:
    """Time combine, PCGrad and GradDrop against their peers for one shape."""
    g = torch.Generator(device="cpu").manual_seed(0)
    J = torch.randn(T, P, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    w = torch.randn(T, generator=g).to(device)
    perms = random_orders(T, generator=g, device=device)
    fns: dict[str, Callable[[], object]] = {
        FLOOR: lambda: one_read(J),
        "column sum (J.sum(0))": lambda: column_sum(J),
        "combine: gradops": lambda: combine(J, w),
        "combine: w @ J": lambda: w.to(J.dtype) @ J,
        "pcgrad: gradops": lambda: pcgrad(J, perms=perms),
        "graddrop: gradops": lambda: graddrop(J),
        "graddrop: torch formula": lambda: torch_graddrop(J),
    }
    if vector_form:
        fns["pcgrad: vector form, sync per pair (LibMTL)"] = lambda: pcgrad_reference(J, perms)
    jd = torchjd_aggregators()
    if jd and dtype == torch.float32:
        fns["pcgrad: TorchJD PCGrad"] = lambda: jd["pcgrad"](J)
        fns["graddrop: TorchJD GradDrop"] = lambda: jd["graddrop"](J)
    return _rows(fns, J, 1, device, rounds, budget_s)


def _rows(fns, J, L, device, rounds, budget_s) -> list[Row]:
    secs = time_side_by_side(fns, device, rounds, budget_s)
    nbytes = J.numel() * J.element_size()
    floor = min(secs[FLOOR], secs["column sum (J.sum(0))"])
    rows = []
    for name, s in secs.items():
        op, _, impl = name.partition(": ") if ": " in name else ("read", "", name)
        rows.append(Row(op=op, impl=impl, T=J.shape[0], P=J.shape[1],
                        L=L if op == "segment_gram" else 1,
                        dtype=str(J.dtype).replace("torch.", ""), device=device_name(device),
                        ms=s * 1e3, gbps=nbytes / s / 1e9, x_read=s / floor))
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def format_rows(rows: Sequence[Row]) -> str:
    """A Markdown table of benchmark rows."""
    head = ("| op | implementation | T | P | L | dtype | ms | GB/s of J | x one read |\n"
            "|---|---|---:|---:|---:|---|---:|---:|---:|")
    body = [f"| {r.op} | {r.impl} | {r.T} | {r.P:,} | {r.L} | {r.dtype} | {r.ms:.2f} | "
            f"{r.gbps:.1f} | {r.x_read:.2f} |" for r in rows]
    return "\n".join([head, *body])


def write_csv(rows: Sequence[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].as_dict()))
        w.writeheader()
        for r in rows:
            w.writerow(r.as_dict())


# --- per-neuron top-K masks (sparse training, SPEC §5) ------------------------------------------
# The selection of the ST paper (Zhang et al., Sec. 3.4) is computed for every Linear/Conv weight
# of the shared encoder once before training; the suite times it for all weights of ViT-B/16.
VIT_B16_SHAPES: tuple[tuple[int, ...], ...] = (
    ((768, 3, 16, 16),)                                           # patch_embed.proj (conv)
    + ((2304, 768), (768, 768), (3072, 768), (768, 3072)) * 12)   # qkv, proj, fc1, fc2 per block


def vit_b16_weights(device: torch.device, dtype: torch.dtype = torch.float32
                    ) -> tuple[list[torch.Tensor], str]:
    """The Linear/Conv weights of ViT-B/16's encoder (the classifier head left out), and where
    they came from: timm's ``vit_base_patch16_224`` (random init, no download) when timm is
    importable, else random tensors of the same shapes (:data:`VIT_B16_SHAPES`)."""
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None:
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        ws = [m.weight.detach() for name, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not name.startswith("head")]
        source = f"timm {timm.__version__} vit_base_patch16_224 (random init)"
    else:
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(s, generator=g) * 0.02 for s in VIT_B16_SHAPES]
        source = "synthetic tensors of ViT-B/16's shapes (timm not importable)"
    return [w.to(device=device, dtype=dtype).contiguous() for w in ws], source


def topk_mask_all(weights: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """gradops: one ``topk_mask`` call per weight."""
    return [topk_mask(w, k) for w in weights]


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


# --- sparse training optimizers (SPEC §5) ---------------------------------------------------------
class _ViTB16Encoder(torch.nn.Module):
    """A stand-in with the parameters of timm's ViT-B/16 encoder (same names and shapes), used
    when timm is not importable. Parameters only: it is never run forward."""

    def __init__(self, depth: int = 12, dim: int = 768, hidden: int = 3072, tokens: int = 197):
        super().__init__()
        nn = torch.nn
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            b.mlp = nn.Module()
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
            self.blocks.append(b)
        self.norm = nn.LayerNorm(dim)


def vit_b16_encoder(device: torch.device) -> tuple[torch.nn.Module, str]:
    """ViT-B/16's encoder (no classifier head; 85.8M parameters) on ``device``: timm's
    ``vit_base_patch16_224`` with ``num_classes=0`` (random init, no download) when timm is
    importable, else :class:`_ViTB16Encoder` (the same parameter names and shapes)."""
    torch.manual_seed(0)
    try:
        import timm
    except ImportError:
        return _ViTB16Encoder().to(device), "ViT-B/16-shaped stand-in (timm not importable)"
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    return model.to(device), f"timm {timm.__version__} vit_base_patch16_224 encoder (random init)"


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

    from .optim import SparseAdamW, SparseTraining

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
    from .sparse import psn_masks
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
