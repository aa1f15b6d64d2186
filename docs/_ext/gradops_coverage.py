"""Sphinx extension: the API reference covers every public name. After reading all pages, each
name in the ``__all__`` of a module documented with ``automodule`` (``docs/api/``) must have an
entry (a function, class, attribute... or a submodule with a page); a missing one is a warning,
so the strict build fails on it. Submodules named in ``__all__`` count when they have their own
``automodule`` page, or are skipped when the page excludes them on purpose
(``:exclude-members:``)."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

from sphinx.util import logging

logger = logging.getLogger(__name__)
AUTOMODULE = re.compile(r"^\.\. automodule:: (\S+)\s*$((?:\n   :.*$)*)", re.M)


def _documented_modules(srcdir: str) -> dict[str, set[str]]:
    """``{module: excluded names}`` of every ``automodule`` in docs/api/."""
    out: dict[str, set[str]] = {}
    for page in sorted(Path(srcdir, "api").glob("*.rst")):
        for m in AUTOMODULE.finditer(page.read_text(encoding="utf-8")):
            excl = re.search(r":exclude-members:\s*(.*)$", m.group(2), re.M)
            out[m.group(1)] = ({n.strip() for n in excl.group(1).split(",")} if excl else set())
    return out


def _check(app, env) -> None:
    objects = env.get_domain("py").objects
    modules = _documented_modules(app.srcdir)
    for modname, excluded in modules.items():
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", ()):
            full = f"{modname}.{name}"
            if name in excluded and f"{full}" in modules or full in objects:
                continue
            if name in excluded and full not in modules:
                logger.warning(f"API reference: {full} is excluded on {modname}'s page and has "
                               "no page of its own")
                continue
            if name == "__version__":
                continue
            logger.warning(f"API reference: {full} (in {modname}.__all__) is not documented")


def _drop_type_docstring(app, what, name, obj, options, lines) -> None:
    """A constant without a doc comment gets its type's docstring from autodoc (``dict``'s,
    ``tuple``'s): drop it, the value is shown."""
    if what in ("data", "attribute") and lines:
        doc = getattr(type(obj), "__doc__", None)
        text = "\n".join(lines).strip()
        if isinstance(doc, str) and doc and text == inspect.cleandoc(doc).strip():
            lines.clear()


def setup(app):
    app.connect("env-check-consistency", _check)
    app.connect("autodoc-process-docstring", _drop_type_docstring)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
