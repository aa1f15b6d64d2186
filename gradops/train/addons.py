"""What the trainer's loop calls for Recon branching (``--recon``), selective task-group
updates (``--method selective``) and the gradient probes (``--probe``): option checks, the
branched model, the selective step and the extra run-directory files (see docs/recon.md).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config.schema import TrainConfig
    from .engine.trainer import Trainer

__all__ = ["validate_addons", "branch_trainer_model", "shared_module", "selective_trainer_step",
           "write_addon_outputs", "addon_files"]


def validate_addons(cfg: TrainConfig) -> None:
    """Check ``--recon``, ``--recon-topk``, ``--recon-init``, ``--probe``,
    ``--selective-decay``, ``--selective-warmup`` (raises :class:`ConfigError`)."""
    from .engine.probes import parse_probe
    from .models.branch import INITS
    from .recon.search import read_ranking, top_layers
    if cfg.recon:
        if cfg.method == "stl":
            raise ConfigError("--recon", "stl has no shared encoder to branch")
        top_layers(read_ranking(cfg.recon), cfg.recon_topk)
    elif cfg.recon_topk:
        raise ConfigError("--recon-topk", "needs --recon RANKING_JSON")
    if cfg.recon_init not in INITS:
        raise ConfigError("--recon-init", f"unknown value {cfg.recon_init!r}", INITS)
    parse_probe(cfg.probe)
    if not 0.0 < cfg.selective_decay <= 1.0:
        raise ConfigError("--selective-decay", f"must be in (0, 1], got {cfg.selective_decay}")
    if cfg.selective_warmup < 0:
        raise ConfigError("--selective-warmup", f"must be >= 0, got {cfg.selective_warmup}")


def branch_trainer_model(net: nn.Module, cfg: TrainConfig, input_shape: tuple[int, ...]
                         ) -> tuple[nn.Module, dict[str, Any]]:
    """The model with the top ``--recon-topk`` layers of the ``--recon`` ranking
    task-specific, and its :func:`~gradops.train.recon.branch_report`."""
    from .recon import branch_model, branch_report, read_ranking, top_layers
    layers = top_layers(read_ranking(cfg.recon), cfg.recon_topk)
    try:
        branched = branch_model(net, layers, init=cfg.recon_init)
    except ValueError as e:
        raise ConfigError("--recon", f"{cfg.recon} does not fit this encoder: {e}") from e
    dev = next(net.parameters()).device
    report = branch_report(net.encoder, branched.encoder, torch.zeros(2, *input_shape,
                                                                      device=dev))
    return branched, report


def shared_module(net: nn.Module) -> nn.Module:
    """The module holding the shared parameters: the encoder, or a branched encoder's base."""
    from .models.branch import BranchedMTLModel
    return net.encoder.base if isinstance(net, BranchedMTLModel) else net.encoder


def selective_trainer_step(tr: Trainer, x: torch.Tensor, ys: dict[str, torch.Tensor]):
    """One batch of ``--method selective`` on the trainer's model and optimizer (AMP's
    GradScaler, clipping and sparse training as in the other methods); returns the losses
    before the first group's step and that forward's outputs."""
    from .engine.trainer import _keep_running_stats
    from .engine.selective import selective_step
    sc = tr.scaler

    def forward():
        return tr._losses(tr.model, x, ys)

    def update(loss: torch.Tensor) -> None:
        tr.opt.zero_grad(set_to_none=True)
        (sc.scale(loss) if sc is not None else loss).backward()
        tr.clip_and_step()

    def measure():
        with torch.no_grad(), _keep_running_stats(tr.net):
            return tr._losses(tr.net, x, ys)[0]

    return selective_step(tr.selective, forward, update, measure, reduce=tr.dist.mean_)


def addon_files(tr: Trainer) -> tuple[str, ...]:
    """The names of the files :func:`write_addon_outputs` writes for this trainer."""
    names: tuple[str, ...] = ()
    if getattr(tr, "branch_report", None) is not None:
        names += ("recon.json",)
    if getattr(tr, "selective", None) is not None:
        names += ("selective_groups.csv", "selective_affinity.csv", "selective_affinity.png",
                  "selective_groups.png")
    if getattr(tr, "probe", None) is not None:
        names += ("probes.csv", "probes.png")
    return names


def write_addon_outputs(tr: Trainer, out: Path) -> None:
    """``recon.json`` (the branching report), the selective updates' files and the probes'
    files, as far as the run uses them (rewritten after every epoch)."""
    out = Path(out)
    if getattr(tr, "branch_report", None) is not None:
        from .engine.checkpoint import atomic_write_text
        atomic_write_text(out / "recon.json", json.dumps(tr.branch_report, indent=1) + "\n")
    if getattr(tr, "selective", None) is not None:
        from .engine.selective import write_selective_outputs
        write_selective_outputs(tr.selective, [t.name for t in tr.tasks], out)
    if getattr(tr, "probe", None) is not None:
        tr.probe.write(out)
