"""Helpers of ``scripts/gpu-check.sh`` (the prepared GPU check), one subcommand each:

- ``env``: the Python, the packages the check uses and the device;
- ``copy-bw --device D --out F [--small]``: the device's copy bandwidth, the yardstick of the
  check's GB/s figures: ``dst.copy_(src)`` on a large float32 buffer, bytes read plus bytes
  written per second, the best (and median) of 20 timed copies after a warm-up;
- ``summary WORKDIR``: the one-page ``summary.md``: each step's status and time, the test counts
  and failing tests, and the headline figures read from the steps' CSVs (the ops' GB/s and their
  fraction of the copy bandwidth; the MTL step / floor ratios; peak memory in copies of ``J``).
  Every figure printed is read from a file a step wrote; a missing file is said, never filled in.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import time
import xml.etree.ElementTree as ET


ENV_PACKAGES = ("torch", "triton", "numpy", "setuptools", "torchjd", "timm", "expecttest", "scipy",
                "pytest", "xdist")


def print_env() -> int:
    """The machine: Python, the packages the check uses (version or missing) and the device."""
    import importlib.metadata as md
    import platform
    import sys
    print("python", sys.version.split()[0], platform.machine())
    for name in ENV_PACKAGES:
        dist = {"xdist": "pytest-xdist"}.get(name, name)
        try:
            print(name, md.version(dist))
        except md.PackageNotFoundError:
            print(name, "missing")
    import torch
    print("cuda available", torch.cuda.is_available(), "torch cuda", torch.version.cuda)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
              "memory GiB", round(p.total_memory / 2**30, 1))
    return 0

def copy_bandwidth(device, nbytes: int, rounds: int = 20) -> dict:
    """Time ``rounds`` copies of an ``nbytes`` float32 buffer on ``device``; returns the best
    and median rates in GB/s (read + write bytes)."""
    import torch
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    secs = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            secs.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            secs.append(time.perf_counter() - t0)
    secs.sort()
    moved = 2 * n * 4
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)")
    return {"device": name, "bytes": n * 4, "rounds": rounds,
            "gbps_best": moved / secs[0] / 1e9, "gbps_median": moved / secs[len(secs) // 2] / 1e9}


def read_csv(path: str, delimiter: str = ",") -> list[dict]:
    """The rows of a CSV (or, with ``delimiter="\\t"``, TSV) file; none when it is missing."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def steps_table(work: str) -> list[str]:
    rows = read_csv(os.path.join(work, "steps.tsv"), delimiter="\t")
    out = ["| step | status | seconds | limit (s) |", "|---|---|---:|---:|"]
    for r in rows:
        out.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {r['limit']} |")
    return out


def pytest_section(work: str) -> list[str]:
    path = os.path.join(work, "pytest-gpu.xml")
    if not os.path.exists(path):
        return ["No JUnit file: the pytest_gpu step did not finish (see its log)."]
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    lines = [f"`pytest -m gpu`: {passed} passed, {counts['failures']} failed, "
             f"{counts['errors']} errors, {counts['skipped']} skipped "
             f"({counts['tests']} collected)."]
    bad = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                msg = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
                bad.append(f"- {kind}: `{case.get('classname')}::{case.get('name')}` {msg}")
    if bad:
        lines += ["", f"Failing ({len(bad)}, the first 40):", *bad[:40]]
    return lines


def ops_section(work: str) -> list[str]:
    rows = read_csv(os.path.join(work, "ops.csv"))
    if not rows:
        return ["No ops.csv: the ops steps did not finish (see their logs)."]
    bw = None
    bw_path = os.path.join(work, "copy_bw.json")
    if os.path.exists(bw_path):
        with open(bw_path) as f:
            bw = json.load(f)
    lines = []
    if bw:
        lines.append(f"Copy bandwidth (read + write) measured on {bw['device']}: "
                     f"{bw['gbps_best']:.0f} GB/s best, {bw['gbps_median']:.0f} GB/s median.")
    else:
        lines.append("No copy_bw.json: the fraction of the copy bandwidth is not given.")
    lines += ["", "gradops' ops (GB/s of J read; x one read = time over the one-read floor's):",
              "", "| op | T | dtype | ms | GB/s | x one read | fraction of copy bandwidth |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("impl") != "gradops":
            continue
        gbps = float(r["gbps"])
        frac = f"{gbps / bw['gbps_best']:.2f}" if bw else "-"
        lines.append(f"| {r['op']} | {r['T']} | {r['dtype']} | {float(r['ms']):.3f} | "
                     f"{gbps:.0f} | {float(r['x_read']):.2f} | {frac} |")
    return lines


def _csv_table(work: str, name: str, missing: str, head: str, cells) -> list[str]:
    """A Markdown table of ``work/name``'s rows (``cells(row)``: the row's cells after the
    encoder / T / method / implementation columns), or ``missing`` when there is none."""
    rows = read_csv(os.path.join(work, name))
    if not rows:
        return [missing]
    lines = [f"| encoder | T | method | implementation | {head} |",
             "|---|---:|---|---|" + "---:|" * (head.count("|") + 1)]
    for r in rows:
        lines.append(f"| {r.get('encoder', '-')} | {r['T']} | {r['method']} | {r['impl']} | "
                     + " | ".join(cells(r)) + " |")
    return lines


def mtl_section(work: str) -> list[str]:
    def cells(r):
        paired = r.get("x_floor_paired")
        return [f"{float(r['ms']):.2f}", f"{float(r['x_floor']):.2f}",
                f"{float(paired):.2f}" if paired else "-"]
    return _csv_table(work, "mtl.csv",
                      "No mtl.csv: the mtl steps did not finish (see their logs).",
                      "ms | x floor | x floor (paired)", cells)


def memory_section(work: str) -> list[str]:
    def cells(r):
        return [f"{float(r['peak_mb']):.1f}", f"{float(r['copies_of_J']):.2f}",
                f"{float(r['extra_over_floor']):.2f}"]
    return _csv_table(work, "mtl_memory.csv",
                      "No mtl_memory.csv: the mtl_memory step did not finish (see its log).",
                      "peak MB | copies of J | extra over floor", cells)


def env_lines(work: str) -> list[str]:
    path = os.path.join(work, "env.log")
    if not os.path.exists(path):
        return ["(no env.log)"]
    with open(path) as f:
        text = f.read().splitlines()
    keep = [ln for ln in text if ln.split(" ")[0] in (
        "python", "torch", "triton", "numpy", "setuptools", "torchjd", "timm", "expecttest",
        "cuda", "device")]
    return ["```", *keep, "```"]


def summary(work: str, dry_run: int, elapsed: int, budget: int) -> str:
    """The Markdown of ``summary.md`` from the files the steps wrote under ``work``."""
    mode = "DRY RUN on the CPU at tiny sizes (no figure here is a GPU figure)" if dry_run \
        else "on the GPU"
    out = [f"# gradops GPU check, {datetime.date.today()}", "",
           f"Mode: {mode}. Wall time {elapsed} s of a {budget} s budget.", "",
           "## Environment", "", *env_lines(work), "",
           "## Steps", "", *steps_table(work), "",
           "## Tests", "", *pytest_section(work), "",
           "## Ops", "", *ops_section(work), "",
           "## One MTL training step", "", *mtl_section(work), "",
           "## Peak memory of one step", "", *memory_section(work), ""]
    compare = os.path.join(work, "compare", "report.md")
    out += ["## Quick compare", "",
            "report.md written (in gpu-check.tar.gz under compare/)" if os.path.exists(compare)
            else "No compare/report.md: the compare step did not finish (see its log).", ""]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="print the machine's versions and device")
    pb = sub.add_parser("copy-bw", help="measure the device's copy bandwidth into a JSON file")
    pb.add_argument("--device", default="cuda")
    pb.add_argument("--out", required=True)
    pb.add_argument("--small", action="store_true", help="64 MB instead of 2 GiB (dry run)")
    ps = sub.add_parser("summary", help="write summary.md (Markdown on standard output)")
    ps.add_argument("work")
    ps.add_argument("--dry-run", type=int, default=0)
    ps.add_argument("--elapsed", type=int, default=-1)
    ps.add_argument("--budget", type=int, default=-1)
    a = p.parse_args()
    if a.cmd == "env":
        return print_env()
    if a.cmd == "copy-bw":
        import torch
        device = torch.device(a.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("gpu_check copy-bw: --device cuda, but no CUDA device is visible")
            return 2
        res = copy_bandwidth(device, 64 * 2**20 if a.small else 2 * 2**30)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res))
        return 0
    print(summary(a.work, a.dry_run, a.elapsed, a.budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
