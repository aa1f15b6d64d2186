"""``--method`` and ``--method-opt``: the trainer's methods and their options, read from the
method registry (:mod:`gradops.weighting`).

``--method-opt`` is a comma-separated list of ``KEY=VALUE`` (an option of the run's method) or
``METHOD.KEY=VALUE`` (an option of ``METHOD``, used only by its runs: the form a grid of several
methods needs), e.g. ``--method cagrad --method-opt c=0.5`` or, in a TOML config,
``method_opt = "cagrad.c=0.5, famo.gamma=0.01"``. Values are read by the option's type
(``true`` / ``false``, ``none``, numbers; several floats as ``0.1/0.2/0.3``).

Config files written before the registry spelled some options as their own keys
(``cagrad_c``, ``graddrop_leak``, ``pcgrad_libmtl_self_visit``, ``dwa_temperature``,
``famo_lr``, ``famo_gamma``); :func:`legacy_method_opt` reads them into ``method_opt``.
"""
from __future__ import annotations

from typing import Any

from ...weighting import canonical_name, get_method, method_names, parse_option_value
from .errors import ConfigError

__all__ = ["trainer_methods", "check_method", "parse_method_opt", "method_options",
           "LEGACY_KEYS", "legacy_method_opt"]

OPTION = "--method-opt"

#: Old config keys -> (the methods, the option), with the defaults they had.
LEGACY_KEYS: dict[str, tuple[tuple[str, ...], str, Any]] = {
    "cagrad_c": (("cagrad",), "c", 0.4),
    "graddrop_leak": (("graddrop",), "leak", 0.0),
    "pcgrad_libmtl_self_visit": (("pcgrad", "pcgrad-layer"), "libmtl_self_visit", False),
    "dwa_temperature": (("dwa",), "temperature", 2.0),
    "famo_lr": (("famo",), "lr", 0.025),
    "famo_gamma": (("famo",), "gamma", 0.001),
}


def trainer_methods() -> tuple[str, ...]:
    """Every registered method: the trainer runs them all (``gradops info`` lists them)."""
    return method_names()


def check_method(name: str, option: str = "--method") -> str:
    """The registered spelling of the method ``name``; :class:`ConfigError` naming ``option``
    for an unknown one."""
    try:
        return canonical_name(name)
    except (TypeError, ValueError):
        raise ConfigError(option, f"unknown method {name!r}", trainer_methods()) from None


def _items(text: str) -> list[tuple[str | None, str, str]]:
    """``"c=0.4, famo.gamma=0.01"`` -> ``[(None, "c", "0.4"), ("famo", "gamma", "0.01")]``."""
    out = []
    for raw in str(text).split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ConfigError(OPTION, f"malformed item {item!r} in {text!r} (expected "
                              "KEY=VALUE or METHOD.KEY=VALUE)")
        method, dot, opt = key.rpartition(".")
        out.append((check_method(method, OPTION) if dot else None, opt.strip(), value.strip()))
    return out


def parse_method_opt(text: str, method: str) -> dict[str, Any]:
    """The options of ``method`` that ``text`` sets (checked: every item names a known method
    and one of its options, with a value of the option's type and range)."""
    method = check_method(method)
    cls = get_method(method)
    opts: dict[str, Any] = {}
    for target, key, value in _items(text):
        if target is None and cls.kind == "trainer":
            raise ConfigError(OPTION, f"{key}={value}: method {method!r} takes no options")
        owner = get_method(target or method)
        try:
            parsed = parse_option_value(owner, key, value)
        except ValueError as e:
            hint = "" if target else (f"; prefix the option with its method (e.g. "
                                      f"cagrad.{key}={value}) to set it for one method of a grid")
            raise ConfigError(OPTION, f"{e}{hint}") from None
        if (target or method) == method:
            opts[key] = parsed
    try:
        cls(**opts)                                   # the method's own range checks
    except (TypeError, ValueError) as e:
        raise ConfigError(OPTION, str(e)) from None
    return opts


def method_options(cfg: Any) -> dict[str, Any]:
    """The options of ``cfg.method`` from ``cfg.method_opt``."""
    return parse_method_opt(cfg.method_opt, cfg.method)


def legacy_method_opt(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (config keys) with the old per-method keys folded into ``method_opt`` (a value equal
    to the old default is dropped: it is the registry's default too)."""
    out = {k: v for k, v in d.items() if k.replace("-", "_") not in LEGACY_KEYS}
    extra = []
    for k, v in d.items():
        key = k.replace("-", "_")
        if key not in LEGACY_KEYS:
            continue
        methods, opt, default = LEGACY_KEYS[key]
        if v == default:
            continue
        text = str(v).lower() if isinstance(v, bool) else str(v)
        extra += [f"{m}.{opt}={text}" for m in methods]
    if extra:
        mo = str(out.get("method_opt", out.get("method-opt", "")) or "")
        out.pop("method-opt", None)
        out["method_opt"] = ", ".join(x for x in [mo] + extra if x)
    return out
