"""Command-line options from :class:`TrainConfig`'s fields, and the merge of defaults, config
file and command line (used by ``gradops train`` and ``gradops compare``)."""
from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from .schema import TrainConfig, option_name, read_toml
from .errors import ConfigError
from .method_options import trainer_methods

__all__ = ["add_config_options", "given_options", "merge_config", "parse_list"]

_HELP = {
    "data": "data set (digits, digits-attrs, or a registered one)",
    "data_root": "directory of a data set read from local files",
    "method": "a registered method (gradops info lists them): " + ", ".join(trainer_methods()),
    "method_opt": "the method's options, KEY=VALUE or METHOD.KEY=VALUE (for one method of a "
                  "grid), comma-separated, e.g. c=0.5 or cagrad.c=0.5,famo.gamma=0.01",
    "sparse": "sparse training of the encoder: off, k=INT or fraction=FLOAT",
    "backbone": "cnn, mlp, or a timm model name (random init)",
    "weights": "encoder weights from a local file (a state dict)",
    "batch_size": "global batch size (split over the processes under torchrun)",
    "optim": "inner optimizer: adam, adamw or sgd",
    "schedule": "LR schedule, stepped per epoch: cosine, step, multistep (--milestones) or none",
    "clip": "clip the global gradient norm to this (0: off)",
    "amp": "mixed precision: off, bf16 or fp16 (with a GradScaler)",
    "device": "auto (cuda when available), cpu or cuda",
    "stats": "per-task gradients for the conflict statistics also for ew and the loss-level "
             "methods",
    "train_limit": "use only the first N training samples (0: all)",
    "eval_limit": "evaluate only the first N val / test samples (0: all)",
    "recon": "Recon: branch the top --recon-topk layers of this ranking.json (gradops recon "
             "search)",
    "recon_topk": "Recon: number of top-ranked layers made task-specific",
    "recon_init": "Recon: the task copies' weights: reinit (fresh, as the paper) or copy",
    "selective_decay": "--method selective: EMA weight of a new affinity measurement",
    "selective_warmup": "--method selective: batches with singleton groups",
    "probe": "gradient probes (Elich et al.): off or every=INT,samples=INT",
    "threads": "torch CPU threads (0: torch's default)",
    "memory_format": "layout of the model's 4-D weights and activations: auto (channels_last "
                     "for --backbone cnn on CPU, else contiguous), contiguous or channels_last",
}


def _parse_bool(v: str) -> bool:
    return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[v]


def add_config_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One ``--<field>`` option per :class:`TrainConfig` field (default: not given)."""
    types = {"int": int, "float": float, "str": str}
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        opt = option_name(f.name)
        default = f.default
        help_ = _HELP.get(f.name, f.name.replace("_", " ")) + f" (default {default!r})"
        if f.type == "bool":
            p.add_argument(opt, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_)
        else:
            p.add_argument(opt, dest=f.name, type=types[f.type], default=argparse.SUPPRESS,
                           help=help_, metavar=f.name.upper())


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`TrainConfig` fields given on the command line."""
    keys = set(TrainConfig.keys())
    return {k: v for k, v in vars(args).items() if k in keys}


def merge_config(args: argparse.Namespace, base: dict[str, Any] | None = None,
                 extra_keys: tuple[str, ...] = ()) -> tuple[TrainConfig, dict[str, Any]]:
    """Defaults < ``base`` < ``--config FILE`` < command line. Returns the config and the config
    file's values for ``extra_keys`` (e.g. ``methods`` / ``seeds`` of ``compare``)."""
    merged: dict[str, Any] = dict(base or {})
    extra: dict[str, Any] = {}
    if getattr(args, "config", None):
        values = read_toml(args.config)
        for k, v in values.items():
            key = k.replace("-", "_")
            if key in extra_keys:
                extra[key] = v
            elif key in TrainConfig.keys():
                merged[key] = v
            else:
                raise ConfigError("--config", f"{args.config}: unknown key {k!r}",
                                  sorted(TrainConfig.keys()) + list(extra_keys))
    merged.update(given_options(args))
    return TrainConfig.from_dict(merged), extra


def parse_list(value: Any, option: str, item=str) -> list:
    """A comma-separated string (or a TOML list) as a list of ``item``."""
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    else:
        parts = [s.strip() for s in str(value).split(",") if s.strip()]
    try:
        return [item(s) for s in parts]
    except ValueError as e:
        raise ConfigError(option, f"malformed list {value!r} ({e})") from e
