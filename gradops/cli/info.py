"""``gradops info``: which backend serves each op on this machine, and the registered methods."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="which backends serve each op on each device, and the "
                       "registered methods")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from .._backend import format_info, info
    from ..weighting import all_methods
    report = info()
    report["methods"] = [m.describe() for m in all_methods()]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_info(report))
        print()
        print(format_methods(report["methods"]))
    return 0


def format_methods(methods: list[dict]) -> str:
    """The registry as a text table: name, kind, display name, options and their defaults."""
    rows = [("method", "kind", "name", "options (defaults)")]
    for m in methods:
        opts = ", ".join(f"{k}={v!r}" for k, v in m["options"].items()) or "-"
        rows.append((m["name"], m["kind"], m["display"], opts))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"methods ({len(methods)}; gradops.weighting.method_names()):"]
    lines += ["  " + "  ".join(r[i].ljust(w[i]) for i in range(3)) + "  " + r[3] for r in rows]
    return "\n".join(lines)
