"""Sphinx extension: one page per registered method, generated from the method registry
(:func:`gradops.weighting.all_methods`) when the build starts, so that a method added as a new
module of ``gradops/weighting/`` gets its page, its row in the methods index and its API entry
without any edit here.

The pages are written to ``docs/method/`` (generated, not committed). A method's class is
documented on its page (``autoclass``), and skipped on the ``gradops.weighting`` API page, so
that ``:class:`gradops.weighting.PCGrad``` resolves to the method page.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
from typing import Any

OUT_DIR = "method"

KIND_TEXT = {
    "sum": "fixed weights of the task losses: one backward of their weighted sum",
    "gram": "weights `w [T]` from the Gram `G = J J^T`, then `d = w^T J`",
    "layer": "weights `[L, T]` from the per-layer Grams `[L, T, T]`, then a segmented combine",
    "elementwise": "the combined gradient from one pass over `J`",
    "loss": "per-task terms from the losses (summed, or weighted from their Gram)",
    "trainer": "a mode of the bundled trainer (`gradops train --method`), not an optimizer "
               "method",
}


def _option_comments(options_cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the source of the Options dataclass and of
    the Options classes it extends (the options' documentation, where the method's authors
    wrote it; a subclass's comment wins)."""
    out: dict[str, str] = {}
    for cls in reversed(options_cls.__mro__):
        try:
            src = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for line in src.splitlines():
            m = re.match(r"\s+(\w+)\s*:[^=#]*=[^#]*#\s*(.+)$", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def method_page(cls: type) -> str:
    import gradops.weighting as W

    d = cls.describe()
    name = d["name"]
    comments = _option_comments(cls.Options)
    lines = [f"# {d['display']} (`{name}`)", "",
             f"{d['paper']}.", "",
             "| | |", "|---|---|",
             f"| name | `{name}` |",
             f"| kind | `{d['kind']}`: {KIND_TEXT.get(d['kind'], '')} |",
             f"| class | {{class}}`gradops.weighting.{cls.__name__}` |"]
    fn = W.METHODS.get(name)
    if fn is not None:
        lines.append(f"| function `G -> w` | {{func}}`gradops.weighting.{fn.__name__}` |")
    lines += [f"| scale invariant | {_yes(d['scale_invariant'])} |",
              f"| iterative solver | {_yes(d['iterative'])} |",
              f"| random | {_yes(d['random'])} |", ""]
    lines += ["## Options", ""]
    if d["options"]:
        lines += ["| option | default | note |", "|---|---|---|"]
        for k, v in d["options"].items():
            lines.append(f"| `{k}` | `{v!r}` | {_cell(comments.get(k, ''))} |")
    else:
        lines.append("None.")
    lines.append("")
    lines += ["## Use", ""]
    opts = {f.name: f.default for f in dataclasses.fields(cls.Options)
            if f.default is not dataclasses.MISSING}
    first = next(iter(opts.items()), None)
    if d["kind"] == "trainer":
        lines += ["```bash", f"gradops train --method {name} --out runs/{name}", "```", ""]
    else:
        kw = (f",\n                                 method_options={{{first[0]!r}: {first[1]!r}}}"
              if first else "")
        cli = f" --method-opt {first[0]}={_cli_value(first[1])}" if first else ""
        lines += ["```python",
                  f"opt = gradops.optim.MTLOptimizer(inner, method={name!r}{kw})",
                  "```", "", "```bash",
                  f"gradops train --method {name}{cli} --out runs/{name}", "```", ""]
    lines += ["## Reference", "", "```{eval-rst}",
              f".. autoclass:: gradops.weighting.{cls.__name__}", "   :no-members:",
              "```", ""]
    if fn is not None:
        # the plain function holds the math (its page entry is on the API page)
        lines += ["### The function `G -> w`", "", "```{eval-rst}",
                  f".. autofunction:: gradops.weighting.{fn.__name__}", "   :no-index:",
                  "```", ""]
    return "\n".join(lines)


def _cli_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return "/".join(str(x) for x in v)
    return str(v)


def index_page(methods: tuple[type, ...]) -> str:
    from gradops.weighting import KINDS

    lines = ["# Methods", "",
             "One page per method of the registry (`gradops.weighting.all_methods()`), "
             "generated when the site is built. What each method computes, its conventions "
             "and how it differs from other implementations: [](../methods.md); adding one: "
             "[](../adding-a-method.md).", "",
             "| method | name | kind | paper |", "|---|---|---|---|"]
    for cls in methods:
        lines.append(f"| [{_cell(cls.display)}]({cls.name}.md) | `{cls.name}` | `{cls.kind}` "
                     f"| {_cell(cls.paper)} |")
    lines += ["", "Kinds:", ""]
    lines += [f"- `{k}`: {KIND_TEXT.get(k, '')}" for k in KINDS]
    lines += ["", "```{toctree}", ":hidden:", ""] + [cls.name for cls in methods] + ["```", ""]
    return "\n".join(lines)


def _write(path: str, text: str) -> None:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def generate(srcdir: str) -> list[str]:
    """Write the pages; return the docnames written."""
    from gradops.weighting import all_methods

    out = os.path.join(srcdir, OUT_DIR)
    os.makedirs(out, exist_ok=True)
    methods = all_methods()
    wanted = {f"{cls.name}.md": method_page(cls) for cls in methods}
    wanted["index.md"] = index_page(methods)
    for stale in set(os.listdir(out)) - set(wanted):
        os.remove(os.path.join(out, stale))
    for fname, text in wanted.items():
        _write(os.path.join(out, fname), text)
    return sorted(wanted)


def _builder_inited(app) -> None:
    generate(app.srcdir)


def _skip_method_classes(app, what, name, obj, skip, options):
    """On the ``gradops.weighting`` page, skip the registered method classes (their pages
    document them)."""
    from gradops.weighting import all_methods

    if what == "module" and isinstance(obj, type) and obj in set(all_methods()):
        return True
    return None


def setup(app):
    app.connect("builder-inited", _builder_inited)
    app.connect("autodoc-skip-member", _skip_method_classes)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
