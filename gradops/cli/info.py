"""``gradops info``: which backend serves each op on this machine."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="which backends serve each op on each device")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from .._backend import format_info, info
    report = info()
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0
