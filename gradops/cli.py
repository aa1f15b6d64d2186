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
    P = args.P if args.P else (262_144 if args.quick else 4_194_304)
    Ts = _parse_ints(args.T)
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
    print()
    print(benchmark.format_rows(rows))
    if args.csv:
        benchmark.write_csv(rows, args.csv)
        print(f"\nwrote {args.csv}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradops", description="Fused kernels for multi-task learning")
    sub = p.add_subparsers(dest="command", required=True)

    pi = sub.add_parser("info", help="which backends serve each op on each device")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.set_defaults(fn=_cmd_info)

    pb = sub.add_parser("bench", help="benchmark the ops against reference implementations")
    pb.add_argument("--suite", choices=("gram", "methods", "all"), default="all",
                    help="gram: gram/segment_gram; methods: combine/pcgrad/graddrop")
    pb.add_argument("--T", default="2,8,40", help="comma-separated task counts (default 2,8,40)")
    pb.add_argument("--P", type=lambda s: int(float(s)), default=0,
                    help="columns of J (default 4,194,304; 262,144 with --quick)")
    pb.add_argument("--segments", type=int, default=100, help="segments for segment_gram")
    pb.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    pb.add_argument("--device", default="cpu", help="cpu or cuda")
    pb.add_argument("--backend", default=None, help="force a gradops backend "
                    "(triton, cuda, cpp, torch)")
    pb.add_argument("--rounds", type=int, default=15, help="timed rounds (median reported)")
    pb.add_argument("--budget", type=float, default=20.0,
                    help="seconds per shape after which timing stops (>= 3 rounds)")
    pb.add_argument("--quick", action="store_true", help="small P (a smoke run)")
    pb.add_argument("--no-pair-loops", action="store_true",
                    help="skip the Python pair-loop peers and the vector-form PCGrad (slow at "
                         "large T)")
    pb.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    pb.set_defaults(fn=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
