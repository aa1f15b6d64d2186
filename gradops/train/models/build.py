"""The trainer's network for a data set's tasks, for every backbone (``--backbone``): a
:class:`~gradops.train.models.dense.DenseMTLModel` when the tasks are dense, else an
:class:`~gradops.train.models.encoders.MTLModel` (one per task for ``stl``); and, with
``--recon``, that network with the top-K layers of a Recon ranking made task-specific.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config.backbones import DENSE_BACKBONES
from ..config.errors import ConfigError
from ..config.extras import read_ranking, top_layers
from ..config.schema import TrainConfig
from ..tasks.dense import is_dense
from ..tasks.types import Task
from .branch import branch_model, branch_report
from .dense import DenseMTLModel, build_dense_encoder
from .encoders import MTLModel, STLModel, build_encoder, load_weights

__all__ = ["build_model", "branch_trainer_model"]


def _dense_net(backbone: str, input_shape: tuple[int, ...], width: int, tasks: Sequence[Task],
               weights: str | None) -> DenseMTLModel:
    enc = build_dense_encoder(backbone, input_shape[0], width)
    if weights:
        load_weights(enc, weights)
    return DenseMTLModel(enc, tasks, "segnet" if backbone == "segnet" else "conv")


def build_model(backbone: str, input_shape: tuple[int, ...], width: int, tasks: Sequence[Task],
                weights: str | None = None, stl: bool = False) -> nn.Module:
    """The trainer's network for ``tasks``: a :class:`DenseMTLModel` when the tasks are dense,
    else :class:`~gradops.train.models.encoders.MTLModel`; with ``stl`` one such model per task
    (:class:`~gradops.train.models.encoders.STLModel`)."""
    dense = [is_dense(t) for t in tasks]
    if any(dense) and not all(dense):
        raise ConfigError("--data", "a data set mixes dense and per-image tasks, which no "
                          "model of the trainer serves")
    if not any(dense) and backbone in DENSE_BACKBONES:
        raise ConfigError("--backbone", f"{backbone!r} is a dense-prediction backbone; the "
                          "tasks of this data set are per image", ["cnn", "mlp",
                                                                   "a timm model name"])

    def one(ts: Sequence[Task]) -> nn.Module:
        if all(dense):
            return _dense_net(backbone, input_shape, width, ts, weights)
        enc, feat = build_encoder(backbone, input_shape, width, weights)
        return MTLModel(enc, feat, list(ts))

    if stl:
        return STLModel({t.name: one([t]) for t in tasks})
    return one(tasks)


def branch_trainer_model(net: nn.Module, cfg: TrainConfig, input_shape: tuple[int, ...]
                         ) -> tuple[nn.Module, dict[str, Any]]:
    """The model with the top ``--recon-topk`` layers of the ``--recon`` ranking
    task-specific, and its :func:`~gradops.train.models.branch.branch_report`."""
    layers = top_layers(read_ranking(cfg.recon), cfg.recon_topk)
    try:
        branched = branch_model(net, layers, init=cfg.recon_init)
    except ValueError as e:
        raise ConfigError("--recon", f"{cfg.recon} does not fit this encoder: {e}") from e
    dev = next(net.parameters()).device
    report = branch_report(net.encoder, branched.encoder, torch.zeros(2, *input_shape,
                                                                      device=dev))
    return branched, report
