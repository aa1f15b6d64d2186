"""Presets of ``gradops train --preset NAME``: the data set, model and training budget of a
paper's benchmark protocol, and ``--budget quick``, the same code path on a few batches.

- ``nyuv2-mtan``: NYUv2 with the SegNet encoder-decoder at MTAN's width, the budget of MTAN (Liu
  et al., CVPR 2019), Nash-MTL (Navon et al., ICML 2022) and FAMO (Liu et al., NeurIPS 2023):
  Adam, lr 1e-4, StepLR(100 epochs, 0.5), 200 epochs, batch 2; FAMO's weight decay gamma 0.001.
- ``cityscapes-mtan``: CityScapes (7 classes, 128x256), the same model and schedule, batch 8
  (FAMO's CityScapes budget), FAMO gamma 0.01.
- ``celeba-famo``: CelebA's 40 attributes at 64x64, FAMO's budget: Adam, lr 3e-4, 15 epochs,
  batch 256, constant learning rate; the built-in CNN encoder.
- ``multi-fashion-recon``: Multi-Fashion, Recon's budget (Shi et al., ICLR 2023): SGD, lr 0.1,
  120 epochs, batch 256, the learning rate divided by 10 at epochs 60 and 90.

Which epoch to report differs between the papers (MTAN and Nash-MTL average the last 10 epochs;
LibMTL and FAMO's CelebA take the epoch that is best on the validation split), so the report of
``gradops compare`` gives both (:mod:`gradops.train.report.epochs`). Options given explicitly
(command line, ``--config``) win over the preset's.
"""
from __future__ import annotations

from typing import Any

from .errors import ConfigError

__all__ = ["PRESETS", "TRAIN_BUDGETS", "preset_config"]

_MTAN = {"backbone": "segnet", "width": 64, "optim": "adam", "lr": 1e-4, "weight_decay": 0.0,
         "schedule": "step", "step_size": 100, "gamma": 0.5, "epochs": 200}
PRESETS: dict[str, dict[str, Any]] = {
    "nyuv2-mtan": {"data": "nyuv2", **_MTAN, "batch_size": 2, "eval_batch_size": 4,
                   "method_opt": "famo.gamma=0.001"},
    "cityscapes-mtan": {"data": "cityscapes", **_MTAN, "batch_size": 8, "eval_batch_size": 16,
                        "method_opt": "famo.gamma=0.01"},
    "celeba-famo": {"data": "celeba", "backbone": "cnn", "width": 16, "optim": "adam",
                    "lr": 3e-4, "weight_decay": 0.0, "schedule": "none", "epochs": 15,
                    "batch_size": 256, "eval_batch_size": 512},
    "multi-fashion-recon": {"data": "multi-fashion", "backbone": "cnn", "width": 8,
                            "optim": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0,
                            "schedule": "multistep", "milestones": "60,90", "gamma": 0.1,
                            "epochs": 120, "batch_size": 256, "eval_batch_size": 1024},
}
TRAIN_BUDGETS = ("full", "quick")
_QUICK_BATCHES = 3


def preset_config(name: str | None, budget: str = "full") -> dict[str, Any]:
    """The option values of preset ``name`` (``{}`` for None) under ``budget``: ``full`` (the
    paper's) or ``quick`` (two epochs on three training batches, evaluated on two batches)."""
    if budget not in TRAIN_BUDGETS:
        raise ConfigError("--budget", f"unknown budget {budget!r}", TRAIN_BUDGETS)
    if name is None:
        if budget == "quick":
            raise ConfigError("--budget", "quick needs a --preset", PRESETS)
        return {}
    if name not in PRESETS:
        raise ConfigError("--preset", f"unknown preset {name!r}", PRESETS)
    cfg = dict(PRESETS[name])
    if budget == "quick":
        cfg.update(epochs=2, train_limit=_QUICK_BATCHES * cfg["batch_size"],
                   eval_limit=2 * cfg["eval_batch_size"])
    return cfg
