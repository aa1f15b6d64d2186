"""The README's method table, generated from the method registry
(:func:`gradops.weighting.all_methods`).

    python scripts/method_table.py --check README.md   # exit 1 when the table and registry differ
    python scripts/method_table.py --write README.md   # rewrite the table in place
    python scripts/method_table.py                     # print the table

The table sits between the two marker lines ``BEGIN`` and ``END`` below; everything else in the
file is left as it is. tests/docs/test_method_table.py runs ``--check`` on the README.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys

BEGIN = ("<!-- method-table: generated from the registry by scripts/method_table.py "
         "--write README.md; do not edit -->")
END = "<!-- /method-table -->"


def render() -> str:
    """The table, in the registry's listing order (by kind, then the methods' order)."""
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
    from gradops.weighting import all_methods

    rows = ["| method | name | kind | paper |", "|---|---|---|---|"]
    for cls in all_methods():
        paper = cls.paper.replace("|", "\\|")
        rows.append(f"| {cls.display} | `{cls.name}` | {cls.kind} | {paper} |")
    return "\n".join(rows)


def split(text: str, path: str) -> tuple[str, str, str]:
    """``(before, table, after)`` of ``text``; ValueError when the markers are missing."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{path}: expected one line {BEGIN!r} and one line {END!r}")
    head, rest = text.split(BEGIN, 1)
    table, tail = rest.split(END, 1)
    return head + BEGIN + "\n", table.strip("\n"), "\n" + END + tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--check", metavar="FILE", help="exit 1 when FILE's table is not the "
                       "registry's")
    group.add_argument("--write", metavar="FILE", help="rewrite FILE's table from the registry")
    a = ap.parse_args(argv)
    table = render()
    path = a.check or a.write
    if path is None:
        print(table)
        return 0
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        head, old, tail = split(text, path)
    except (OSError, ValueError) as e:
        print(f"method_table: {e}", file=sys.stderr)
        return 2
    if a.check:
        if old == table:
            return 0
        diff = difflib.unified_diff(old.splitlines(), table.splitlines(), f"{path} (table)",
                                    "registry", lineterm="")
        print(f"method_table: {path}'s method table differs from the registry; run "
              f"`python scripts/method_table.py --write {path}`:", file=sys.stderr)
        print("\n".join(diff), file=sys.stderr)
        return 1
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + table + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
