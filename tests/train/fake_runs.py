"""Fake run directories written by the run-directory contract, for the report tests and the
trainer tests that read runs (divergence, the fraction sweep).

Grid: ew, pcgrad, cagrad x sparse off / fraction=0.3 x seeds 0, 1, plus stl (off, seeds 0, 1).
Tasks: left (accuracy, f1; up), right (accuracy; up), sum (mae; down).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

DIRECTIONS = {"left": {"accuracy": "up", "f1": "up"}, "right": {"accuracy": "up"},
              "sum": {"mae": "down"}}
LAYERS = ["encoder.conv1", "encoder.bn1", "encoder.conv2"]
EPOCHS = 4
# STL mean over its two seeds: left accuracy 0.91, f1 0.82, right accuracy 0.82, sum mae 2.1
STL = {0: (0.90, 0.80, 0.80, 2.0), 1: (0.92, 0.84, 0.84, 2.2)}
# (method, sparse) -> seed -> (left acc, left f1, right acc, mae, gc_all, gc_last50)
GRID = {
    # ew off s0: left acc -10% (+10), f1 = STL (0) -> 5; right +10% (-10); mae +20% (+20)
    #            -> Δm = (5 - 10 + 20) / 3 = 5.0
    # ew off s1: left f1 -5% (+5) -> 2.5; right 0; mae 0 -> Δm = 2.5 / 3
    ("ew", "off"): {0: (0.819, 0.82, 0.902, 2.52, 0.30, 0.36),
                    1: (0.91, 0.779, 0.82, 2.1, 0.34, 0.38)},
    ("ew", "fraction=0.3"): {0: (0.91, 0.82, 0.82, 2.1, 0.25, 0.28),
                             1: (0.91, 0.82, 0.82, 2.1, 0.27, 0.30)},
    ("pcgrad", "off"): {0: (0.90, 0.81, 0.83, 2.0, 0.31, 0.35),
                        1: (0.91, 0.80, 0.81, 2.2, 0.33, 0.37)},
    ("pcgrad", "fraction=0.3"): {0: (0.92, 0.83, 0.84, 2.0, 0.29, 0.33),
                                 1: (0.92, 0.83, 0.83, 2.1, 0.30, 0.31)},
    ("cagrad", "off"): {0: (0.88, 0.79, 0.80, 2.3, 0.35, 0.40),
                        1: (0.89, 0.78, 0.81, 2.4, 0.36, 0.41)},
    ("cagrad", "fraction=0.3"): {0: (0.90, 0.81, 0.82, 2.2, 0.37, 0.42),
                                 1: (0.90, 0.80, 0.82, 2.2, 0.38, 0.44)},
}


def _tasks(la, lf, ra, mae):
    return {"left": {"accuracy": la, "f1": lf}, "right": {"accuracy": ra}, "sum": {"mae": mae}}


def _hist(centre: float) -> dict:
    edges = [-1 + i * 0.05 for i in range(41)]
    counts = [int(1000 * math.exp(-((e + 0.025 - centre) / 0.3) ** 2)) for e in edges[:-1]]
    return {"edges": edges, "counts": counts}


def write_fake_run(root: Path, method: str, sparse: str, seed: int, vals, gc=None, *,
                   data: str = "digits", result: bool = True) -> Path:
    """A run directory by the contract; ``vals`` = (left acc, left f1, right acc, mae)."""
    run = root / "runs" / f"{method}__{sparse.replace('=', '-')}__s{seed}"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(
        f'data = "{data}"\nmethod = "{method}"\nsparse = "{sparse}"\nseed = {seed}\n'
        f'epochs = {EPOCHS}\nbackbone = "cnn"\n\n[optim]\nname = "adam"\nlr = 0.001\n')
    st = sparse != "off"
    lines = []
    for epoch in range(1, EPOCHS + 1):
        f = epoch / EPOCHS  # metrics approach their final values
        ep_gc = None if gc is None else gc[0] * (0.8 + 0.1 * epoch) - 0.01 * st * epoch
        for split in ("train", "val", "test"):
            lines.append({"epoch": epoch, "split": split,
                          "losses": {"left": 1 / epoch, "right": 1.1 / epoch, "sum": 2 / epoch},
                          "metrics": _tasks(vals[0] * f, vals[1] * f, vals[2] * f,
                                            vals[3] * (2 - f)),
                          "gc": ep_gc if split == "train" else None, "time_s": 1.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    header = "epoch,incidence,mean_cos,gms," + ",".join(f"layer:{n}" for n in LAYERS) + "\n"
    body = ""
    if gc is not None:
        for epoch in range(1, EPOCHS + 1):
            counts = [(3 * j + epoch + 5 * seed) * (1 if not st else 0.5)
                      for j in range(len(LAYERS))]
            body += f"{epoch},{gc[0]},0.1,0.8," + ",".join(str(c) for c in counts) + "\n"
    (run / "conflicts.csv").write_text(header + body)
    if result:
        res = {"method": method, "sparse": sparse, "seed": seed, "data": data, "epochs": EPOCHS,
               "tasks": _tasks(*vals), "directions": DIRECTIONS,
               "gc_all": None if gc is None else gc[0], "gc_last50": None if gc is None else gc[1],
               "cosine_hist": None if gc is None else _hist(0.1 + 0.1 * st), "time_s": 10.0 + seed}
        (run / "result.json").write_text(json.dumps(res))
    return run
