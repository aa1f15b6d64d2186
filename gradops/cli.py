"""The ``gradops`` command line: ``gradops info`` and ``gradops bench``."""
from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch


def _cmd_info(args: argparse.Namespace) -> int:
    from ._backend import format_info, info
    report = info()
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0


def _parse_ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import benchmark
    from ._backend import use_backend

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gradops bench: --device cuda asked for, but no CUDA device is visible",
              file=sys.stderr)
        return 2
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.suite == "topk":
        return _bench_topk(args, benchmark, device, dtype)
    if args.suite == "sparse":
        return _bench_sparse(args, benchmark, device)
    if args.suite == "mtl":
        return _bench_mtl(args, device)
    P = args.P if args.P else (262_144 if args.quick else 4_194_304)
    Ts = _parse_ints(args.T or "2,8,40")
    print(f"gradops bench: device {benchmark.device_name(device)}, dtype {args.dtype}, P = {P:,}, "
          f"L = {args.segments} segments, T in {Ts}, {datetime.date.today()}", flush=True)
    suites = ("gram", "methods") if args.suite == "all" else (args.suite,)
    rows = []
    with use_backend(args.backend):
        for T in Ts:
            if "gram" in suites:
                rows += benchmark.bench_case(T, P, args.segments, dtype, device,
                                             rounds=args.rounds, pair_loops=not args.no_pair_loops,
                                             budget_s=args.budget)
            if "methods" in suites:
                rows += benchmark.bench_methods_case(T, P, dtype, device, rounds=args.rounds,
                                                     vector_form=not args.no_pair_loops,
                                                     budget_s=args.budget)
            print(f"  T = {T} done", flush=True)
    return _report(benchmark.format_rows(rows), [], rows, args.csv)


def _report(table: str, notes: list[str], rows, csv_path: str | None) -> int:
    """Print a suite's notes and table, and write its rows to ``csv_path`` when given."""
    from .benchmark import write_csv
    if notes:
        print("\n".join(notes))
    print()
    print(table, flush=True)
    if csv_path:
        write_csv(rows, csv_path)
        print(f"\nwrote {csv_path}", flush=True)
    return 0


def _bench_topk(args: argparse.Namespace, benchmark, device: torch.device,
                dtype: torch.dtype) -> int:
    """``gradops bench --suite topk``: per-neuron top-k masks of all ViT-B/16 encoder weights."""
    from ._backend import use_backend
    print(f"gradops bench --suite topk: device {benchmark.device_name(device)}, "
          f"dtype {args.dtype}, k = {args.k}, {datetime.date.today()}", flush=True)
    with use_backend(args.backend):
        rows, notes = benchmark.bench_topk_case(args.k, dtype, device, rounds=args.rounds,
                                                budget_s=args.budget,
                                                paper_loop=not args.no_pair_loops)
    return _report(benchmark.format_topk_rows(rows), notes, rows, args.csv)


def _bench_sparse(args: argparse.Namespace, benchmark, device: torch.device) -> int:
    """``gradops bench --suite sparse``: SparseAdamW vs dense AdamW on ViT-B/16's encoder."""
    from ._backend import use_backend
    print(f"gradops bench --suite sparse: device {benchmark.device_name(device)}, fp32, "
          f"trainable fraction {args.fraction}, {datetime.date.today()}", flush=True)
    with use_backend(args.backend):
        rows, notes = benchmark.bench_sparse_case(args.fraction, device, rounds=args.rounds,
                                                  budget_s=args.budget)
    return _report(benchmark.format_sparse_rows(rows), notes, rows, args.csv)


def _bench_mtl(args: argparse.Namespace, device: torch.device) -> int:
    """``gradops bench --suite mtl``: one training step of a 4-layer MLP (4.2M shared params)
    with T heads, every method: gradops vs T plain backward passes (the floor) vs TorchJD."""
    import os

    from . import benchmark_mtl as bm
    from ._backend import use_backend
    from .benchmark import device_name, write_csv
    Ts = _parse_ints(args.T or "3,8,40")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods \
        else list(bm.METHODS)
    bad = [m for m in methods if m not in bm.METHODS]
    if bad:
        print(f"gradops bench --suite mtl: unknown method(s) {bad}; valid: "
              f"{', '.join(bm.METHODS)}", file=sys.stderr)
        return 2
    width = 256 if args.quick else 1024
    omp = os.environ.get("OMP_WAIT_POLICY", "(unset; PASSIVE advised on a shared machine)")
    print(f"gradops bench --suite mtl: device {device_name(device)}, fp32, MLP encoder "
          f"4 x Linear({width}, {width}), batch 64, T in {Ts}, SGD, {datetime.date.today()}, "
          f"OMP_WAIT_POLICY={omp}", flush=True)
    with use_backend(args.backend):
        rows, notes = bm.bench_mtl(Ts, methods, device=str(device), width=width,
                                   rounds=args.rounds, budget_s=args.budget,
                                   progress=lambda line: print(line, flush=True))
        _report(bm.format_mtl_table(rows), notes, rows, args.csv)
        if args.breakdown:
            T_b = 8 if 8 in Ts else Ts[0]
            stages = bm.breakdown_case(bm.make_setup(T_b, device, width=width), methods,
                                       rounds=args.rounds, budget_s=args.budget)
            print(f"\ngradops step breakdown, T = {T_b} (stages timed one by one, synced):\n")
            print(bm.format_stage_table(stages))
            if args.csv:
                path = (args.csv[:-4] if args.csv.endswith(".csv") else args.csv) + \
                    "_breakdown.csv"
                write_csv(stages, path)
                print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradops", description="Fused kernels for multi-task learning")
    sub = p.add_subparsers(dest="command", required=True)

    pi = sub.add_parser("info", help="which backends serve each op on each device")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.set_defaults(fn=_cmd_info)

    pb = sub.add_parser("bench", help="benchmark the ops against reference implementations")
    pb.add_argument("--suite", choices=("gram", "methods", "all", "topk", "sparse", "mtl"),
                    default="all",
                    help="gram: gram/segment_gram; methods: combine/pcgrad/graddrop; topk: "
                         "per-neuron top-k masks of ViT-B/16's weights; sparse: SparseAdamW vs "
                         "dense AdamW steps on ViT-B/16's encoder; mtl: one training step of a "
                         "4.2M-parameter MLP with T heads, every MTLOptimizer method vs T plain "
                         "backward passes vs TorchJD (topk, sparse and mtl are not part of all)")
    pb.add_argument("--T", default=None,
                    help="comma-separated task counts (default 2,8,40; mtl suite: 3,8,40)")
    pb.add_argument("--methods", default=None,
                    help="mtl suite: comma-separated methods (default all: ew, pcgrad, "
                         "pcgrad_layer, graddrop, mgda, cagrad, imtlg, nashmtl, alignedmtl, "
                         "gradvac)")
    pb.add_argument("--breakdown", action="store_true",
                    help="mtl suite: also split gradops' step into stages at T = 8")
    pb.add_argument("--P", type=lambda s: int(float(s)), default=0,
                    help="columns of J (default 4,194,304; 262,144 with --quick)")
    pb.add_argument("--segments", type=int, default=100, help="segments for segment_gram")
    pb.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    pb.add_argument("--device", default="cpu", help="cpu or cuda")
    pb.add_argument("--backend", default=None, help="force a gradops backend "
                    "(triton, cuda, cpp, torch)")
    pb.add_argument("--k", type=int, default=300,
                    help="topk suite: entries kept per output neuron (default 300, the paper's)")
    pb.add_argument("--fraction", type=float, default=0.3,
                    help="sparse suite: trainable fraction of the encoder (default 0.3)")
    pb.add_argument("--rounds", type=int, default=15, help="timed rounds (median reported)")
    pb.add_argument("--budget", type=float, default=20.0,
                    help="seconds per shape after which timing stops (>= 3 rounds)")
    pb.add_argument("--quick", action="store_true",
                    help="small P (a smoke run); mtl suite: a 4 x Linear(256, 256) encoder")
    pb.add_argument("--no-pair-loops", action="store_true",
                    help="skip the Python pair-loop peers and the vector-form PCGrad (slow at "
                         "large T), and in the topk suite the paper's per-row numpy loop")
    pb.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    pb.set_defaults(fn=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
