"""Timing helpers shared by every suite: contenders timed interleaved, round by round, so that
machine noise hits them alike; the device's name; the machine's load."""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int,
                      budget_s: float = 20.0) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round.

    One warm-up call each first; stops early (with at least 3 rounds) when ``budget_s`` is spent.
    The order of the calls rotates by one each round, so that no function always runs right
    after the same other one (whose cache and allocator state it would inherit).
    """
    for fn in fns.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    names = list(fns)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def recorded(fn: Callable[[], object], device: torch.device
              ) -> tuple[Callable[[], object], list[float]]:
    """``fn`` wrapped to record the seconds of each call (synced, as time_side_by_side's)."""
    times: list[float] = []

    def call():
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        return out
    return call, times


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
