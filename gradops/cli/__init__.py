"""The ``gradops`` command line.

One module per command (``info``, ``bench``, ``train``, ``compare``, ...). Each module has a
``register(subparsers)`` that adds its sub-parser and sets ``fn`` to a ``run(args) -> int``; a
command module only parses arguments and calls library code. Exit codes: 0 on success, 2 for bad
input (a one-line message on stderr naming the option), anything else for a failure.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Command modules, in the order ``gradops --help`` lists them.
COMMANDS = ("info", "bench", "train", "compare", "recon")


def build_parser() -> argparse.ArgumentParser:
    """The ``gradops`` argument parser with every command's sub-parser."""
    p = argparse.ArgumentParser(prog="gradops",
                                description="Fused kernels for multi-task learning")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradops`` script and of ``python -m gradops``."""
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
