"""Rows of the ops suites, Markdown tables, and results CSVs that say what they are.

Every CSV row carries the run's metadata in columns (:func:`run_metadata`): date, device, the
torch / triton / gradops versions and the gradops git revision, so that one file can hold many
runs (append with ``--csv PATH --append``) and no file name needs a suffix to tell runs apart.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import subprocess
from collections.abc import Sequence

import torch

from .timing import device_name, time_side_by_side
from .peers import FLOOR

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


def op_rows(fns, J, L, device, rounds, budget_s) -> list[Row]:
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


def format_rows(rows: Sequence[Row]) -> str:
    """A Markdown table of benchmark rows."""
    head = ("| op | implementation | T | P | L | dtype | ms | GB/s of J | x one read |\n"
            "|---|---|---:|---:|---:|---|---:|---:|---:|")
    body = [f"| {r.op} | {r.impl} | {r.T} | {r.P:,} | {r.L} | {r.dtype} | {r.ms:.2f} | "
            f"{r.gbps:.1f} | {r.x_read:.2f} |" for r in rows]
    return "\n".join([head, *body])



def git_revision() -> str:
    """The gradops checkout's ``git describe --always --dirty`` revision, or "" outside a
    checkout (an installed wheel)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=here,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def run_metadata(device: torch.device | str = "cpu") -> dict[str, str]:
    """The columns every results CSV row carries: date, device, host threads, versions, revision."""
    from .. import __version__
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    dev = torch.device(device)
    return {"date": datetime.date.today().isoformat(), "device_name": device_name(dev),
            "torch": torch.__version__, "triton": triton_version, "gradops": __version__,
            "git_rev": git_revision(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def write_csv(rows: Sequence, path: str, device: torch.device | str = "cpu",
              append: bool = False) -> None:
    """Write dataclass ``rows`` (or dicts) to ``path``, each with :func:`run_metadata`'s columns
    first. ``append=True`` adds to an existing file with the same columns (else a ValueError)."""
    if not rows:
        raise ValueError("write_csv: no rows to write")
    meta = run_metadata(device)
    dicts = [{**meta, **(r if isinstance(r, dict) else dataclasses.asdict(r))} for r in rows]
    fields = list(dicts[0])
    exists = append and os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            have = next(csv.reader(f), [])
        if have != fields:
            raise ValueError(f"write_csv: {path} has columns {have}, these rows have {fields}")
    with open(path, "a" if exists else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if not exists:
            w.writeheader()
        w.writerows(dicts)


def emit(table: str, notes: Sequence[str], rows: Sequence, csv_path: str | None,
         device: torch.device | str = "cpu", append: bool = False) -> int:
    """Print a suite's notes and table, and write its rows to ``csv_path`` when given."""
    if notes:
        print("\n".join(notes))
    print()
    print(table, flush=True)
    if csv_path:
        write_csv(rows, csv_path, device, append)
        print(f"\nwrote {csv_path}", flush=True)
    return 0
