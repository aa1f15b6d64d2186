"""Sphinx extension: what a strict (``-n``) build accepts as a reference that has no page.

A Python reference (``:func:``, ``:class:``, a type hint...) must resolve. Where it names an
object that exists but has no entry in the site (a private helper such as
``gradops.weighting._solvers._simplex_qp``, a submodule of the trainer, ``int``,
``torch.Tensor``: no intersphinx, the build does not use the network), it is rendered as plain
code, without a link and without a warning. A reference to a name that cannot be imported (a
typo, a renamed or removed function) stays a warning, and the strict build fails on it.
"""
from __future__ import annotations

import builtins
import importlib
import sys
from typing import Any

_MISSING = object()


def _lookup(dotted: str) -> Any:
    """The object called ``dotted`` (``pkg.mod.attr.attr``), importing modules as needed, or
    ``_MISSING``."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        modname = ".".join(parts[:i])
        mod = sys.modules.get(modname)
        if mod is None:
            try:
                mod = importlib.import_module(modname)
            except Exception:
                continue
        obj: Any = mod
        for attr in parts[i:]:
            obj = getattr(obj, attr, _MISSING)
            if obj is _MISSING:
                break
        if obj is not _MISSING:
            return obj
    return _MISSING


def _candidates(target: str, module: str | None, cls: str | None) -> list[str]:
    target = target.lstrip(".~")
    out = [target]
    if module:
        if cls:
            out.append(f"{module}.{cls}.{target}")
        out.append(f"{module}.{target}")
        # a relative reference from a package's docstring (``:mod:`.config```)
        parent = module
        while "." in parent:
            parent = parent.rsplit(".", 1)[0]
            out.append(f"{parent}.{target}")
        # a name the documented object's own module imports (``nn.Module``, a helper of a
        # submodule of the package the page documents)
        out += [f"{m}.{target}" for m in sorted(sys.modules) if m.startswith(module + ".")]
    out.append(f"builtins.{target}")
    out.append(f"typing.{target}")
    return out


def _missing_reference(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not target or " " in target:
        return None
    module, cls = node.get("py:module"), node.get("py:class")
    for name in _candidates(target, module, cls):
        if name.startswith("builtins.") and not hasattr(builtins, name[9:]):
            continue
        if _lookup(name) is not _MISSING:
            return contnode
    return None


def setup(app):
    app.connect("missing-reference", _missing_reference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
