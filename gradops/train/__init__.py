"""The bundled trainer: ``gradops train`` (one run) and ``gradops compare`` (a grid of runs and
the report), built on :class:`gradops.optim.MTLOptimizer` and :func:`gradops.sparse.psn_masks`.

Example::

    from gradops.train import TrainConfig, run_training, run_grid
    result = run_training(TrainConfig(method="pcgrad", sparse="fraction=0.3", epochs=2),
                          "runs/pcgrad")
    run_grid(TrainConfig(epochs=2), ["ew", "pcgrad"], ["off", "fraction=0.3"], [0, 1], "cmp")

Modules: :mod:`.config` (the options), :mod:`.data` (data sets), :mod:`.models`, :mod:`.tasks`
(losses and metrics), :mod:`.loss_methods` (UW, DWA, FAMO), :mod:`.loop` (the epoch loop),
:mod:`.stats` (conflict statistics), :mod:`.checkpoint`, :mod:`.distributed` (torchrun),
:mod:`.run` (one run directory), :mod:`.grid` (``compare``). Needs scikit-learn for the digits
data sets and tqdm for progress bars (``pip install gradops[train]``).
"""
from __future__ import annotations

from .config import METHODS, TrainConfig, parse_sparse
from .errors import ConfigError
from .grid import BUDGETS, run_grid, run_name
from .run import run_training

__all__ = ["BUDGETS", "ConfigError", "METHODS", "TrainConfig", "parse_sparse", "run_grid",
           "run_name", "run_training"]
