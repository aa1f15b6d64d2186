"""Reading the run directories of ``gradops compare`` for the report.

A run directory (``<out>/runs/<method>__<sparse>__s<seed>/``, with "=" in the sparse setting
written as "-") holds ``result.json`` (final test metrics, incidence of gradient conflict over all
epochs and over the last 50% of epochs, the histogram of pairwise cosines, wall time),
``metrics.jsonl`` (one line per evaluated epoch and split), ``conflicts.csv`` (per epoch:
incidence, mean cosine, GMS and per-layer conflict counts) and ``config.toml``. A run without a
readable, well-formed ``result.json`` crashed or is incomplete, and one whose ``result.json`` says
``"status": "diverged"`` (:mod:`gradops.train.engine.divergence`) failed: both are returned as a
:class:`MissingRun` (``status`` "missing" or "diverged") with the reason, never dropped, and never
averaged into a table.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

from ...weighting import get_method
from .delta_m import DIRECTIONS

__all__ = ["METHOD_ORDER", "Conflicts", "EpochLine", "MissingRun", "Run", "display_name",
           "load_run", "load_runs", "method_key", "sparse_key",
           "parse_run_dir_name"]

_RUN_DIR = re.compile(r"^(?P<method>.+?)__(?P<sparse>.+?)(?:__lr(?P<lr>[^_]+))?"
                      r"__s(?P<seed>-?\d+)$")
_CONFLICT_COLUMNS = ["epoch", "incidence", "mean_cos", "gms"]


@dataclasses.dataclass(frozen=True)
class EpochLine:
    """One line of ``metrics.jsonl``: an epoch (from 1) evaluated on one split."""
    epoch: int
    split: str
    losses: dict[str, float]
    metrics: dict[str, dict[str, float]]
    gc: float | None
    time_s: float | None


@dataclasses.dataclass(frozen=True)
class Conflicts:
    """``conflicts.csv``: per epoch, incidence, mean cosine, GMS and per-layer conflict counts."""
    epochs: list[int]
    incidence: list[float]
    mean_cos: list[float]
    gms: list[float]
    layers: list[str]               # module names, without the "layer:" prefix
    counts: list[list[float]]       # [epoch][layer]


@dataclasses.dataclass(frozen=True)
class Run:
    """A complete run: its ``result.json`` and, when present, its per-epoch logs."""
    name: str
    path: Path
    method: str
    sparse: str
    seed: int
    data: str
    epochs: int
    tasks: dict[str, dict[str, float]]
    directions: dict[str, dict[str, str]]
    gc_all: float | None
    gc_last50: float | None
    cosine_hist: dict | None        # {"edges": [n + 1 floats], "counts": [n numbers]}
    time_s: float
    log: list[EpochLine]            # last line per (epoch, split), sorted by epoch
    conflicts: Conflicts | None     # None: absent or no per-task gradients (header only)
    backbone: str | None
    notes: list[str]                # what could not be read (shown in the report)
    lr: float | None = None         # the run's learning rate (None: not recorded)


@dataclasses.dataclass(frozen=True)
class MissingRun:
    """A run directory without a usable ``result.json`` (crashed, killed or still running;
    ``status`` "missing") or whose run diverged (``status`` "diverged", with its ``epoch`` and
    ``task``): a failed run, counted and listed but never averaged."""
    name: str
    path: Path
    method: str | None
    sparse: str | None
    seed: int | None
    reason: str
    status: str = "missing"
    lr: float | None = None
    epoch: int | None = None
    task: str | None = None


def parse_run_dir_name(name: str) -> tuple[str, str, int] | None:
    """``"pcgrad__fraction-0.3__s1"`` -> ``("pcgrad", "fraction=0.3", 1)``; None if no match."""
    m = _RUN_DIR.match(name)
    if m is None:
        return None
    sparse = m["sparse"]
    if sparse != "off":
        sparse = sparse.replace("-", "=", 1)
    return m["method"], sparse, int(m["seed"])


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _nested_numbers(value: object, key: str) -> dict[str, dict[str, float]]:
    _expect(isinstance(value, Mapping) and len(value) > 0, f"{key!r} must be a non-empty object")
    out = {}
    for task, metrics in value.items():
        _expect(isinstance(metrics, Mapping) and len(metrics) > 0,
                f"{key}[{task!r}] must be a non-empty object")
        for metric, v in metrics.items():
            _expect(_is_number(v), f"{key}[{task!r}][{metric!r}] must be a number, got {v!r}")
        out[str(task)] = {str(k): float(v) for k, v in metrics.items()}
    return out


def _parse_result(raw: object) -> dict:
    _expect(isinstance(raw, Mapping), "result.json must hold a JSON object")
    for key, types in (("method", str), ("sparse", str), ("data", str)):
        _expect(isinstance(raw.get(key), types), f"{key!r} must be a string")
    for key in ("seed", "epochs"):
        _expect(isinstance(raw.get(key), int) and not isinstance(raw.get(key), bool),
                f"{key!r} must be an integer")
    _expect(_is_number(raw.get("time_s")), "'time_s' must be a number")
    tasks = _nested_numbers(raw.get("tasks"), "tasks")
    dirs_raw = raw.get("directions")
    _expect(isinstance(dirs_raw, Mapping), "'directions' must be an object")
    directions = {}
    for task, metrics in tasks.items():
        d = dirs_raw.get(task)
        _expect(isinstance(d, Mapping), f"directions[{task!r}] is missing")
        _expect(set(d) == set(metrics),
                f"directions[{task!r}] names {sorted(d)}, tasks[{task!r}] names {sorted(metrics)}")
        for metric, v in d.items():
            _expect(v in DIRECTIONS, f"directions[{task!r}][{metric!r}] must be 'up' or 'down'")
        directions[task] = {metric: d[metric] for metric in metrics}
    _expect(set(dirs_raw) == set(tasks), f"'directions' names tasks {sorted(dirs_raw)}, "
                                         f"'tasks' names {sorted(tasks)}")
    for key in ("gc_all", "gc_last50"):
        _expect(raw.get(key) is None or _is_number(raw.get(key)),
                f"{key!r} must be null or a number")
    hist = raw.get("cosine_hist")
    if hist is not None:
        _expect(isinstance(hist, Mapping) and isinstance(hist.get("edges"), list)
                and isinstance(hist.get("counts"), list), "'cosine_hist' must be null or "
                "{'edges': [...], 'counts': [...]}")
        edges, counts = hist["edges"], hist["counts"]
        _expect(len(counts) >= 1 and len(edges) == len(counts) + 1
                and all(map(_is_number, edges)) and all(map(_is_number, counts)),
                "'cosine_hist' needs len(edges) == len(counts) + 1 numbers")
        hist = {"edges": [float(e) for e in edges], "counts": [float(c) for c in counts]}
    return {"method": raw["method"], "sparse": raw["sparse"], "seed": raw["seed"],
            "data": raw["data"], "epochs": raw["epochs"], "tasks": tasks,
            "directions": directions,
            "gc_all": None if raw.get("gc_all") is None else float(raw["gc_all"]),
            "gc_last50": None if raw.get("gc_last50") is None else float(raw["gc_last50"]),
            "cosine_hist": hist, "time_s": float(raw["time_s"]),
            "backbone": raw["backbone"] if isinstance(raw.get("backbone"), str) else None,
            "lr": float(raw["lr"]) if _is_number(raw.get("lr")) else None}


def _read_log(path: Path, notes: list[str]) -> list[EpochLine]:
    if not path.is_file():
        notes.append("no metrics.jsonl")
        return []
    lines: dict[tuple[int, str], EpochLine] = {}
    bad = 0
    for text in path.read_text(encoding="utf-8").splitlines():
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
            gc = raw.get("gc")
            metrics = raw.get("metrics") or {}
            losses = raw.get("losses") or {}
            line = EpochLine(epoch=int(raw["epoch"]), split=str(raw["split"]),
                             losses={str(k): float(v) for k, v in losses.items()},
                             metrics={str(t): {str(k): float(v) for k, v in m.items()}
                                      for t, m in metrics.items()},
                             gc=None if gc is None else float(gc),
                             time_s=None if raw.get("time_s") is None else float(raw["time_s"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            bad += 1
            continue
        lines[(line.epoch, line.split)] = line  # a resumed run may repeat an epoch: keep the last
    if bad:
        notes.append(f"metrics.jsonl: {bad} unreadable line(s) skipped")
    return sorted(lines.values(), key=lambda e: (e.epoch, e.split))


def _cell(text: str) -> float:
    return math.nan if text.strip() == "" else float(text)


def _read_conflicts(path: Path, notes: list[str]) -> Conflicts | None:
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return None
    # a row holding only the epoch: no statistics that epoch (no per-task gradients)
    header, body = rows[0], [r for r in rows[1:] if len(r) > 1]
    if header[:4] != _CONFLICT_COLUMNS or not all(h.startswith("layer:") for h in header[4:]):
        notes.append(f"conflicts.csv: unexpected header {header[:6]}")
        return None
    if not body:
        return None
    try:
        if any(len(r) != len(header) for r in body):
            raise ValueError("row length differs from the header")
        return Conflicts(epochs=[int(r[0]) for r in body],
                         incidence=[_cell(r[1]) for r in body],
                         mean_cos=[_cell(r[2]) for r in body], gms=[_cell(r[3]) for r in body],
                         layers=[h[len("layer:"):] for h in header[4:]],
                         counts=[[_cell(c) for c in r[4:]] for r in body])
    except ValueError as e:
        notes.append(f"conflicts.csv unreadable: {e}")
        return None


def _read_toml(path: Path) -> dict | None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            return None
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return None


def load_run(path: str | Path) -> Run | MissingRun:
    """Read one run directory; a :class:`MissingRun` (with the reason) when it has no usable
    ``result.json``. Never raises for the directory's contents."""
    path = Path(path)
    config = _read_toml(path / "config.toml") if (path / "config.toml").is_file() else None
    result_path = path / "result.json"
    reason = None
    diverged: Mapping | None = None
    if not result_path.is_file():
        reason = "no result.json (the run crashed, was killed or is still running)"
    else:
        try:
            raw = json.loads(result_path.read_text(encoding="utf-8"))
            if isinstance(raw, Mapping) and raw.get("status") == "diverged":
                diverged = raw.get("divergence") if isinstance(raw.get("divergence"),
                                                               Mapping) else {}
                reason = str(diverged.get("reason", "diverged (no reason recorded)"))
                if isinstance(raw.get("method"), str) and isinstance(raw.get("sparse"), str):
                    config = {**(config if isinstance(config, dict) else {}), **raw}
            else:
                result = _parse_result(raw)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            reason = f"result.json unreadable: {e}"
        except ValueError as e:
            reason = f"result.json malformed: {e}"
    if reason is not None:
        ident = parse_run_dir_name(path.name)
        if isinstance(config, dict) and {"method", "sparse", "seed"} <= set(config):
            ident = (str(config["method"]), str(config["sparse"]), config["seed"])
        method, sparse, seed = ident if ident is not None else (None, None, None)
        lr = config.get("lr") if isinstance(config, dict) else None
        epoch = diverged.get("epoch") if diverged is not None else None
        task = diverged.get("task") if diverged is not None else None
        return MissingRun(name=path.name, path=path, method=method, sparse=sparse,
                          seed=seed if isinstance(seed, int) else None, reason=reason,
                          status="missing" if diverged is None else "diverged",
                          lr=float(lr) if _is_number(lr) else None,
                          epoch=epoch if isinstance(epoch, int) else None,
                          task=None if task is None else str(task))
    notes: list[str] = []
    if result["backbone"] is None and isinstance(config, dict) and "backbone" in config:
        result["backbone"] = str(config["backbone"])
    if result["lr"] is None and isinstance(config, dict) and _is_number(config.get("lr")):
        result["lr"] = float(config["lr"])
    return Run(name=path.name, path=path, **result, log=_read_log(path / "metrics.jsonl", notes),
               conflicts=_read_conflicts(path / "conflicts.csv", notes), notes=notes)


def load_runs(out_dir: str | Path) -> tuple[list[Run], list[MissingRun]]:
    """Every run directory under ``out_dir/runs/``, sorted by name: (complete, missing).

    Raises:
        FileNotFoundError: ``out_dir/runs`` is not a directory.
        ValueError: two complete runs with the same (method, sparse, seed).
    """
    runs_dir = Path(out_dir) / "runs"
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"out_dir: {runs_dir} is not a directory (gradops compare writes "
                                "one run directory per (method, sparse, seed) there)")
    runs, missing = [], []
    seen: dict[tuple[str, str, int, float | None], str] = {}
    for sub in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        run = load_run(sub)
        if isinstance(run, MissingRun):
            missing.append(run)
            continue
        key = (run.method, run.sparse, run.seed, run.lr)
        if key in seen:
            raise ValueError(f"out_dir: runs {seen[key]!r} and {run.name!r} are both "
                             f"method={key[0]!r}, sparse={key[1]!r}, seed={key[2]}"
                             + ("" if run.lr is None else f", lr={run.lr:g}"))
        seen[key] = run.name
        runs.append(run)
    return runs, missing


# --- naming and ordering shared by the tables and the plots -----------------------------------
#: The ST paper's method order (Tables 1-2), then FAMO and the other methods alphabetically.
METHOD_ORDER = ("stl", "ew", "pcgrad", "cagrad", "graddrop", "mgda", "imtlg", "nashmtl", "famo")


def display_name(method: str) -> str:
    """The registered display name of a method (``"ew"`` -> ``"Joint Train (ew)"``), else the
    name itself (a run of a method this version does not know)."""
    try:
        return get_method(method).display
    except ValueError:
        return method


def method_key(method: str) -> tuple[int, str]:
    """Sort key: the paper's order, then alphabetical."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def sparse_key(sparse: str) -> tuple[int, str]:
    """Sort key: "off" first, then the sparse settings alphabetically."""
    return (0 if sparse == "off" else 1, sparse)
