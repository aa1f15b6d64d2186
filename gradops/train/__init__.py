"""The bundled trainer: ``gradops train`` (one run) and ``gradops compare`` (a grid of runs and
the report), built on :class:`gradops.optim.MTLOptimizer` and :func:`gradops.sparse.psn_masks`.

Example::

    from gradops.train import TrainConfig, run_training, run_grid
    result = run_training(TrainConfig(method="pcgrad", sparse="fraction=0.3", epochs=2),
                          "runs/pcgrad")
    run_grid(TrainConfig(epochs=2), ["ew", "pcgrad"], ["off", "fraction=0.3"], [0, 1], "cmp")

Folders, in the order of the data path (each imports only from those before it):
:mod:`.config` (the options; ``--method`` reads :mod:`gradops.weighting`'s registry, where the
loss-level methods UW, DWA, FAMO also live) -> :mod:`.tasks` (losses and metrics) ->
:mod:`.data` (data sets) -> :mod:`.models` -> :mod:`.engine` (the Trainer, its optimizers,
conflict statistics, checkpoints, torchrun) -> :mod:`.recon` -> :mod:`.runs` (one run
directory, ``compare``'s grid) -> :mod:`.report` (and ``run_grid``). Needs scikit-learn for the
digits data sets and tqdm for progress bars (``pip install gradops[train]``).
"""
from __future__ import annotations

from .config.errors import ConfigError
from .config.method_options import trainer_methods
from .config.schema import TrainConfig, parse_sparse
from .report.compare import run_grid
from .runs.grid import BUDGETS, run_name
from .runs.run import run_training

__all__ = ["BUDGETS", "ConfigError", "METHODS", "TrainConfig", "parse_sparse", "run_grid",
           "run_name", "run_training"]

METHODS: tuple[str, ...] = trainer_methods()
"""The methods ``gradops train --method`` takes: every registered method (read from the registry
when gradops.train is imported; :func:`gradops.weighting.method_names` reads it anew)."""
