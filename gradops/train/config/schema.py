"""The trainer's configuration: one dataclass, read from TOML (``tomllib``), written back as TOML
(a small writer of flat tables), validated with errors that name the option and the valid values.

Precedence: the dataclass defaults, then ``--config FILE``, then the options given on the command
line. The resolved configuration is saved as ``config.toml`` in every run directory.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .backbones import check_backbone
from .datasets import check_dataset
from .errors import ConfigError
from .method_options import check_method, legacy_method_opt, parse_method_opt
from .extras import RECON_INITS, parse_probe, read_ranking, top_layers

__all__ = ["TrainConfig", "SPARSE_RULES",
           "canonical_sparse", "parse_sparse", "parse_sparse_rule", "read_toml", "to_toml",
           "option_name"]

OPTIMS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "multistep", "none")
AMP = ("off", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


def option_name(field: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


SPARSE_RULES = ("psn", "random", "global", "reverse")   # gradops.sparse.METHODS
_SPARSE_FORMS = ["off", "k=INT", "fraction=FLOAT", "FLOAT (a fraction)",
                 "RULE:FLOAT, RULE:k=INT or RULE:fraction=FLOAT with RULE one of "
                 + "/".join(SPARSE_RULES)]


def parse_sparse_rule(value: str, option: str = "--sparse"
                      ) -> tuple[str | None, str, float | int | None]:
    """``--sparse`` with its selection rule: ``"off"`` -> ``(None, "off", None)``, ``"k=300"``
    -> ``("psn", "k", 300)``, ``"fraction=0.3"`` or ``"0.3"`` -> ``("psn", "fraction", 0.3)``,
    ``"random:0.6"`` -> ``("random", "fraction", 0.6)``, ``"reverse:k=30"`` ->
    ``("reverse", "k", 30)``. The rules are those of :func:`gradops.sparse.psn_masks`
    (``method=``; the ST paper's Fig. 5(c) ablation): ``psn`` (per-neuron top-K, the default),
    ``random``, ``global``, ``reverse``. Anything else raises :class:`ConfigError`."""
    v = str(value).strip()
    if v == "off":
        return None, "off", None
    rule, body = "psn", v
    if ":" in v:
        rule, body = (x.strip() for x in v.split(":", 1))
        if rule not in SPARSE_RULES:
            raise ConfigError(option, f"unknown selection rule {rule!r} in {value!r}",
                              SPARSE_RULES)
    m = re.fullmatch(r"(?:(k|fraction)=)?([0-9.eE+-]+)", body)
    if m:
        kind, num = m.groups()
        try:
            if kind == "k":
                k = int(num)
                if k >= 1:
                    return rule, "k", k
            else:
                f = float(num)
                if 0.0 < f <= 1.0:
                    return rule, "fraction", f
        except ValueError:
            pass
    raise ConfigError(option, f"malformed value {value!r} (k: an integer >= 1, fraction: in "
                      "(0, 1])", _SPARSE_FORMS)


def parse_sparse(value: str, option: str = "--sparse") -> tuple[str, float | int | None]:
    """``"off"`` -> ``("off", None)``, ``"k=300"`` -> ``("k", 300)``, ``"fraction=0.3"`` (or
    ``"0.3"``, ``"random:0.3"``) -> ``("fraction", 0.3)``: :func:`parse_sparse_rule` without the
    rule.

    Args:
        value: the setting's text.
        option: the option named in the error message.

    Returns:
        ``(kind, number)``: ``kind`` one of ``"off"``, ``"k"``, ``"fraction"``.

    Raises:
        ConfigError: of ``option``, for a malformed value or an unknown rule.
    """
    _, kind, num = parse_sparse_rule(value, option)
    return kind, num


def canonical_sparse(value: str, option: str = "--sparse") -> str:
    """The one spelling of a sparse setting that run names and reports use: ``"0.6"`` ->
    ``"fraction=0.6"``, ``"random:0.6"`` -> ``"random:fraction=0.6"``; a rule given explicitly
    is kept (``"psn:0.6"`` -> ``"psn:fraction=0.6"``), ``"off"``, ``"k=INT"`` and
    ``"fraction=FLOAT"`` are unchanged. Raises :class:`ConfigError` for a malformed value."""
    rule, kind, num = parse_sparse_rule(value, option)
    if kind == "off":
        return "off"
    body = f"{kind}={num}"
    return f"{rule}:{body}" if ":" in str(value) else body


@dataclass
class TrainConfig:
    """Everything one training run depends on (each field is the option ``--<field>``;
    docs/trainer.md). :meth:`validate` checks the values.

    Attributes:
        data: a registered data set.
        data_root: directory of a data set read from local files.
        data_seed: the splits (fixed for a data set, shared by all runs).
        train_limit: use only the first N training samples (0: all).
        method: a registered method (gradops info).
        method_opt: its options: KEY=VALUE or METHOD.KEY=VALUE, comma-separated.
        sparse: off | k=INT | fraction=FLOAT | FLOAT | RULE:FLOAT ...
        seed: the run's seed (initialisation, data order, the method's generator).
        epochs: training epochs.
        backbone: the encoder: ``cnn``, ``mlp``, ``segnet``, ``resnet-dilated`` or a timm model
            name.
        width: base width of the built-in encoders.
        weights: local encoder weights (timm backbones or the built-ins).
        batch_size: global batch (split over the processes under torchrun).
        optim: the inner optimizer: adam | adamw | sgd.
        lr: the learning rate.
        weight_decay: the inner optimizer's weight decay.
        momentum: SGD's momentum.
        schedule: cosine | step | multistep | none (stepped once per epoch).
        step_size: step schedule: epochs between decays.
        gamma: step schedule: decay factor.
        milestones: multistep schedule: epochs of the decays, e.g. "60,90".
        clip: max global gradient norm (0: no clipping).
        amp: off | bf16 | fp16 (fp16 uses a GradScaler).
        device: auto (cuda when available) | cpu | cuda.
        threads: CPU threads of torch (0: torch's default).
        memory_format: auto (channels_last for the cnn on CPU) | contiguous | channels_last.
        stats: per-task gradients for the statistics also for ew/uw/dwa/famo.
        checkpoint_every: epochs between checkpoints (the last epoch always).
        eval_batch_size: the evaluation batch (the default 128 is faster on CPU than larger
            batches: cache).
        eval_limit: evaluate only the first N val / test samples (0: all).
        recon: Recon: a ranking.json of ``gradops recon search``.
        recon_topk: Recon: how many of its top layers become task-specific.
        recon_init: Recon: reinit | copy (the task copies' initial weights).
        selective_decay: ``--method selective``: EMA weight of a new affinity measurement.
        selective_warmup: ``--method selective``: batches with singleton groups.
        probe: gradient probes: off | every=INT,samples=INT.
    """

    data: str = "digits"            # a registered data set
    data_root: str = ""             # directory of a data set read from local files
    data_seed: int = 0              # the splits (fixed for a data set, shared by all runs)
    train_limit: int = 0            # use only the first N training samples (0: all)
    method: str = "ew"              # a registered method (gradops info)
    method_opt: str = ""            # its options: KEY=VALUE or METHOD.KEY=VALUE, comma-separated
    sparse: str = "off"             # off | k=INT | fraction=FLOAT | FLOAT | RULE:FLOAT ...
    seed: int = 0
    epochs: int = 10
    backbone: str = "cnn"
    width: int = 8                  # base width of the built-in encoders
    weights: str = ""               # local encoder weights (timm backbones or the built-ins)
    batch_size: int = 64            # global batch (split over the processes under torchrun)
    optim: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    momentum: float = 0.9           # sgd
    schedule: str = "cosine"        # cosine | step | none (stepped once per epoch)
    step_size: int = 5              # step schedule: epochs between decays
    gamma: float = 0.5              # step schedule: decay factor
    milestones: str = ""            # multistep schedule: epochs of the decays, e.g. "60,90"
    clip: float = 0.0               # max global gradient norm (0: no clipping)
    amp: str = "off"                # off | bf16 | fp16 (fp16 uses a GradScaler)
    device: str = "auto"            # auto (cuda when available) | cpu | cuda
    threads: int = 0                # CPU threads of torch (0: torch's default)
    memory_format: str = "auto"     # auto (channels_last for the cnn on CPU) | contiguous | ...
    stats: bool = True              # per-task gradients for the statistics also for ew/uw/dwa/famo
    checkpoint_every: int = 1       # epochs between checkpoints (the last epoch always)
    eval_batch_size: int = 128      # on CPU: faster than larger batches (cache)
    eval_limit: int = 0             # evaluate only the first N val / test samples (0: all)
    recon: str = ""                 # Recon: a ranking.json of `gradops recon search`
    recon_topk: int = 0             # Recon: how many of its top layers become task-specific
    recon_init: str = "reinit"      # Recon: reinit | copy (the task copies' initial weights)
    selective_decay: float = 0.001  # selective: EMA weight of a new affinity measurement
    selective_warmup: int = 100     # selective: batches with singleton groups
    probe: str = "off"              # gradient probes: off | every=INT,samples=INT

    # --- validation --------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check every field (types, ranges, names); returns ``self``."""
        for f in fields(self):
            v = getattr(self, f.name)
            want = f.type if isinstance(f.type, type) else {"str": str, "int": int,
                                                             "float": float,
                                                             "bool": bool}[f.type]
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
                setattr(self, f.name, v)
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise ConfigError(option_name(f.name), f"expected {want.__name__}, got {v!r}")
            if want is float and not math.isfinite(v):
                raise ConfigError(option_name(f.name), f"must be finite, got {v!r}")
        check_dataset(self.data, self.data_root or None)
        self.method = check_method(self.method)
        parse_method_opt(self.method_opt, self.method)
        parse_sparse(self.sparse)
        for name, choices in (("optim", OPTIMS), ("schedule", SCHEDULES), ("amp", AMP),
                              ("device", DEVICES), ("memory_format", MEMORY_FORMATS)):
            if getattr(self, name) not in choices:
                raise ConfigError(option_name(name), f"unknown value {getattr(self, name)!r}",
                                  choices)
        for name in ("epochs", "width", "batch_size", "step_size", "checkpoint_every",
                     "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(option_name(name), f"must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "momentum", "clip", "train_limit", "threads",
                     "eval_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(option_name(name), f"must be >= 0, got {getattr(self, name)}")
        if self.schedule == "multistep":
            parse_milestones(self.milestones)
        if self.gamma <= 0:
            raise ConfigError("--gamma", f"must be > 0, got {self.gamma}")
        check_backbone(self.backbone)
        _validate_extras(self)
        return self

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The field names, in order (the config file's keys)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        """A config from ``{field: value}`` (keys with ``-`` or ``_``); unknown keys raise.

        Args:
            d: the values by field name (a config file's table).
            source: what ``d`` came from, for the error message (a file name).

        Returns:
            The config (not validated: call :meth:`validate`).

        Raises:
            ConfigError: of ``--config``, for an unknown key.
        """
        known = set(cls.keys())
        kw = {}
        for k, v in legacy_method_opt(d).items():
            key = k.replace("-", "_")
            if key not in known:
                raise ConfigError("--config", f"{source}: unknown key {k!r}", sorted(known))
            kw[key] = v
        return cls(**kw)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (not validated).

        Args:
            changes: the new values by field name.

        Returns:
            The new config.
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict ``{field: value}`` (what :meth:`from_dict` reads)."""
        return dataclasses.asdict(self)


def parse_milestones(value: str) -> list[int]:
    """``"60,90"`` -> ``[60, 90]`` (increasing epochs >= 1) for ``--schedule multistep``."""
    try:
        ms = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        ms = []
    if not ms or any(m < 1 for m in ms) or ms != sorted(set(ms)):
        raise ConfigError("--milestones", f"expected increasing epochs >= 1 separated by "
                          f"commas (e.g. 60,90) for --schedule multistep, got {value!r}")
    return ms


def _validate_extras(cfg: TrainConfig) -> None:
    """Check ``--recon``, ``--recon-topk``, ``--recon-init``, ``--probe``,
    ``--selective-decay``, ``--selective-warmup`` (raises :class:`ConfigError`)."""
    if cfg.recon:
        if cfg.method == "stl":
            raise ConfigError("--recon", "stl has no shared encoder to branch")
        top_layers(read_ranking(cfg.recon), cfg.recon_topk)
    elif cfg.recon_topk:
        raise ConfigError("--recon-topk", "needs --recon RANKING_JSON")
    if cfg.recon_init not in RECON_INITS:
        raise ConfigError("--recon-init", f"unknown value {cfg.recon_init!r}", RECON_INITS)
    parse_probe(cfg.probe)
    if not 0.0 < cfg.selective_decay <= 1.0:
        raise ConfigError("--selective-decay", f"must be in (0, 1], got {cfg.selective_decay}")
    if cfg.selective_warmup < 0:
        raise ConfigError("--selective-warmup", f"must be >= 0, got {cfg.selective_warmup}")


# --- TOML --------------------------------------------------------------------------------------
def read_toml(path: str | Path) -> dict[str, Any]:
    """The top-level table of a TOML file (a bad file is a :class:`ConfigError` of ``--config``).
    One level of tables is flattened (``[train] lr = 1e-3`` reads as ``lr``)."""
    try:
        import tomllib
    except ImportError:            # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise ConfigError("--config", "reading TOML needs Python >= 3.11 or the tomli "
                              "package") from e
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"no such file: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("--config", f"{p} is not valid TOML: {e}") from e
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, dict):
                    raise ConfigError("--config", f"{p}: nested table [{k}.{kk}] (one level of "
                                      "tables at most)")
                flat[kk] = vv
        else:
            flat[k] = v
    return flat


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"to_toml: cannot write a {type(v).__name__}")


def to_toml(d: dict[str, Any], header: str = "") -> str:
    """Flat ``key = value`` TOML (str, int, float, bool and lists of them); ``header`` becomes
    leading comment lines."""
    lines = [f"# {h}" for h in header.splitlines()] if header else []
    lines += [f"{k} = {_toml_value(v)}" for k, v in d.items()]
    return "\n".join(lines) + "\n"
