"""``gradops bench``: benchmark the ops and the optimizer against the implementations in use.

Only argument parsing lives here; each suite is a module of :mod:`gradops.bench` with a
``main(args)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from ..bench import SUITES


def _positive_ints(text: str, option: str) -> list[int]:
    """``"2,8,40"`` as ints, each >= 1 (``"1e3"`` accepted); an empty or bad list is an error."""
    parts = [x.strip() for x in text.split(",")]
    if not text.strip() or any(not x for x in parts):
        raise ValueError(f"{option}: expected a comma-separated list of integers >= 1, "
                         f"got {text!r}")
    out = []
    for x in parts:
        try:
            v = float(x)
        except ValueError:
            raise ValueError(f"{option}: {x!r} is not an integer") from None
        if v != int(v) or v < 1:
            raise ValueError(f"{option}: must be integers >= 1, got {x}")
        out.append(int(v))
    return out


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values before any suite runs (raises ValueError naming the option)."""
    from .._backend import BACKENDS
    if args.T is not None:
        _positive_ints(args.T, "--T")
    if args.breakdown_at is not None:
        _positive_ints(args.breakdown_at, "--breakdown-at")
    if args.P is not None and args.P < 1:
        raise ValueError(f"--P: must be >= 1, got {args.P}")
    if args.segments < 1:
        raise ValueError(f"--segments: must be >= 1, got {args.segments}")
    if args.backend is not None and args.backend not in BACKENDS:
        raise ValueError(f"--backend: unknown backend {args.backend!r}; valid: "
                         f"{', '.join(BACKENDS)}")
    if args.rounds < 1:
        raise ValueError(f"--rounds: must be >= 1, got {args.rounds}")
    if args.k < 0:
        raise ValueError(f"--k: must be >= 0, got {args.k}")
    if not 0.0 < args.fraction <= 1.0:
        raise ValueError(f"--fraction: must be in (0, 1], got {args.fraction}")
    if args.csv is not None and not args.csv:
        raise ValueError("--csv: empty path")


def _int_option(text: str) -> int:
    """``--P``'s value: an integer (``1e6`` accepted)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v != int(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    return int(v)


def run(args: argparse.Namespace) -> int:
    try:
        check_args(args)
        try:
            torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device: unknown device {args.device!r}; valid: cpu, cuda") \
                from None
    except ValueError as e:
        print(f"gradops bench: error: {e}", file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gradops bench: --device cuda asked for, but no CUDA device is visible",
              file=sys.stderr)
        return 2
    if args.suite == "all":
        from ..bench.methods import main_all
        return main_all(args)
    return importlib.import_module(f"gradops.bench.{args.suite}").main(args)


def register(sub: argparse._SubParsersAction) -> None:
    pb = sub.add_parser("bench", help="benchmark the ops against reference implementations")
    pb.add_argument("--suite", choices=SUITES,
                    default="all",
                    help="gram: gram/segment_gram; methods: combine/pcgrad/graddrop; topk: "
                         "per-neuron top-k masks of ViT-B/16's weights; sparse: SparseAdamW vs "
                         "dense AdamW steps on ViT-B/16's encoder; mtl: one training step of a "
                         "4.2M-parameter MLP with T heads, every MTLOptimizer method vs T plain "
                         "backward passes vs TorchJD; trainer: the bundled trainer's epoch "
                         "time per "
                         "method over ew's on the digits data (only gram and methods are part "
                         "of all)")
    pb.add_argument("--T", default=None,
                    help="comma-separated task counts (default 2,8,40; mtl suite: 3,8,40)")
    pb.add_argument("--methods", default=None,
                    help="mtl and trainer suites: comma-separated methods (default: every "
                         "gradient method of the registry, see gradops info; the trainer "
                         "suite adds the loss-level methods and stl)")
    pb.add_argument("--breakdown", action="store_true",
                    help="mtl suite: also split gradops' step into stages (at T = 8, or at "
                         "--breakdown-at), and print what the Gram and combine stages alone "
                         "cost against the floor")
    pb.add_argument("--breakdown-at", default=None, metavar="T[,T...]",
                    help="mtl suite with --breakdown: the task counts to split (each one of "
                         "--T; default 8 when --T has it, else the first)")
    pb.add_argument("--encoder", choices=("mlp", "cnn"), default="mlp",
                    help="mtl suite: the shared encoder: mlp (4 x Linear(1024, 1024), batch 64) "
                         "or cnn (4 x conv3x3 + BatchNorm + ReLU, 389k parameters, 32x32 "
                         "inputs, batch 32: the J path, except the last convolution, which "
                         "the factored engine takes from T = 8 on)")
    pb.add_argument("--memory", action="store_true",
                    help="mtl suite: measure the peak memory of one step per contender (each "
                         "in a fresh subprocess) instead of its time, in copies of J")
    pb.add_argument("--P", type=_int_option, default=None,
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
    pb.add_argument("--csv", default=None, help="also write the rows to this CSV file (with "
                    "date, device, versions and git revision columns)")
    pb.add_argument("--append", action="store_true",
                    help="add the rows to an existing --csv file with the same columns")
    pb.set_defaults(fn=run)
