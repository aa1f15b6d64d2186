"""The import graph of ``gradops``: no cycles, and every import follows the declared order.

Every module of ``gradops/`` is parsed with :mod:`ast` (nothing is imported). An edge is any
import of a ``gradops`` module, wherever it stands: at module level, inside functions, methods
and classes, inside ``try``/``except`` and other blocks, and ``importlib.import_module`` calls
whose module name is a constant string (or an f-string that starts with a constant package
prefix or ``__name__``: an edge to that package and to every module directly in it; a name
known only at run time, such as a loop variable, is not read). Excluded on purpose: imports
under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``), which never run; names that are no
Python source module of the package (the compiled ``_C`` extension) are no node of the graph.

Resolution: relative imports are resolved against the importing module (a package's
``__init__.py`` is the package itself); ``from X import name`` is an edge to the submodule
``X.name`` when that module exists, else to ``X``; ``import a.b.c`` is an edge to ``a.b.c``.
Importing a submodule also runs its parents' ``__init__.py``; that implicit step is no edge
(otherwise any package that re-exports its modules would be a cycle).

Checks, one test case each (so the cases that pass stay visible while another fails):

* cycles: no cycle among gradops modules; a cycle is printed edge by edge, with the importing
  file and line. Cycles through ``gradops/train`` form their own case.
* order: each scope below declares an order of its entries (top-level modules and packages of
  ``gradops``; the folders of ``gradops/train``). A module may import only from entries before
  its own or from its own entry; a package's ``__init__.py`` may import (re-export) the modules
  of its own folder; an import of the scope's own ``__init__`` (``from .. import __version__``)
  is left to the cycle check. Every module of a scope must lie in a declared entry (in
  ``gradops/train``: in a declared folder, no flat modules besides ``__init__.py``).
"""
from __future__ import annotations

import ast
import dataclasses
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

# ---- the declared order (the data the checks read) ---------------------------------------------
# Top level of gradops: a module may import only from earlier entries or its own entry. Entries
# in one tuple share a rank. `train` stands before `bench`: the trainer benchmark
# (gradops/bench/trainer.py) times the Trainer, and nothing of gradops/train needs gradops/bench.
TOP_LEVEL_ORDER: tuple[tuple[str, ...], ...] = (
    ("_backend",), ("_validate",), ("segments",), ("ops", "reference", "metrics"),
    ("weighting",), ("sparse",), ("optim",), ("train",), ("bench",), ("cli",), ("__main__",),
)
# Folders of gradops/train, following the data path. `tasks` (task types, losses, metrics)
# comes before `data`: a data set declares its tasks with tasks' types.
TRAIN_ORDER: tuple[tuple[str, ...], ...] = (
    ("config",), ("tasks",), ("data",), ("models",), ("engine",), ("recon",), ("runs",),
    ("report",),
)
PACKAGE = "gradops"
TRAIN = "gradops.train"
# scope -> (package the entries are children of, declared order, whether flat modules directly
# in that package are entries of their own)
SCOPES: dict[str, tuple[str, tuple[tuple[str, ...], ...], bool]] = {
    "top-level": (PACKAGE, TOP_LEVEL_ORDER, True),
    "train-folders": (TRAIN, TRAIN_ORDER, False),
}

ROOT = Path(__file__).resolve().parents[1]


# ---- the checker -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Edge:
    src: str          # importing module
    dst: str          # imported module
    path: str         # importing file, relative to the folder above the package
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.src} imports {self.dst}"


@dataclasses.dataclass
class Graph:
    modules: dict[str, str]       # module name -> source file, relative to the folder above
    packages: set[str]            # module names whose file is an __init__.py
    edges: list[Edge]

    def out_edges(self) -> dict[str, list[Edge]]:
        out: dict[str, list[Edge]] = {m: [] for m in self.modules}
        for e in self.edges:
            out[e.src].append(e)
        return out


def _module_name(base: Path, file: Path) -> tuple[str, bool]:
    parts = list(file.relative_to(base).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts.pop()
    return ".".join(parts), is_pkg


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


_ANY_CHILD = ("<any submodule>",)
"""The names of an ``import_module(f"pkg.{x}")`` call: ``pkg`` and any module directly in it."""


def _dynamic_name(call: ast.Call, module: str) -> tuple[str, tuple[str, ...]] | None:
    """The module an ``importlib.import_module(...)`` call imports, as ``(name, ())``, or as
    ``(package, _ANY_CHILD)`` for an f-string ``f"package.{x}"``; None when it cannot be read."""
    f = call.func
    if not ((isinstance(f, ast.Attribute) and f.attr == "import_module")
            or (isinstance(f, ast.Name) and f.id == "import_module")) or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value, ()
    if isinstance(arg, ast.JoinedStr) and arg.values:
        first = arg.values[0]
        if isinstance(first, ast.Constant) and "." in first.value:    # f"gradops.bench.{x}"
            return first.value.rsplit(".", 1)[0], _ANY_CHILD
        if (isinstance(first, ast.FormattedValue) and isinstance(first.value, ast.Name)
                and first.value.id in ("__name__", "__package__")):   # f"{__name__}.{x}"
            return module, _ANY_CHILD
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_pkg: bool) -> None:
        self.module, self.is_pkg = module, is_pkg
        self.found: list[tuple[str, tuple[str, ...], int]] = []   # (module, names, line)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, (), node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            pkg = self.module.split(".") if self.is_pkg else self.module.split(".")[:-1]
            if node.level > 1:
                pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        self.found.append((base, tuple(a.name for a in node.names), node.lineno))

    def visit_Call(self, node: ast.Call) -> None:
        dynamic = _dynamic_name(node, self.module)
        if dynamic is not None:
            self.found.append((*dynamic, node.lineno))
        self.generic_visit(node)


def build_graph(base: Path, package: str) -> Graph:
    """Parse every ``.py`` file of ``base/package`` and resolve its imports of that package."""
    modules: dict[str, str] = {}
    packages: set[str] = set()
    for file in sorted((base / package).rglob("*.py")):
        name, is_pkg = _module_name(base, file)
        modules[name] = file.relative_to(base).as_posix()
        if is_pkg:
            packages.add(name)
    edges: list[Edge] = []
    for name, rel in modules.items():
        col = _Collector(name, name in packages)
        col.visit(ast.parse((base / rel).read_text(encoding="utf-8"), filename=rel))
        for target, names, line in col.found:
            if target != package and not target.startswith(package + "."):
                continue
            if names == _ANY_CHILD:
                dsts = [target] + [m for m in modules if m.rpartition(".")[0] == target]
            else:
                dsts = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                if len(dsts) < len(names) or not names:   # some names are attributes of target
                    dsts.append(target)
            for dst in dsts:
                if dst in modules and dst != name:
                    edges.append(Edge(name, dst, rel, line))
    return Graph(modules, packages, edges)


def _sccs(nodes: Iterable[str], out: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(out[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(out[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    result.append(sorted(comp))
    return result


@dataclasses.dataclass(frozen=True)
class Cycle:
    members: tuple[str, ...]      # the strongly connected component
    edges: tuple[Edge, ...]       # one shortest cycle through its first member

    def __str__(self) -> str:
        names = " -> ".join([self.edges[0].src] + [e.dst for e in self.edges])
        text = "import cycle " + names + "\n" + "\n".join(f"    {e}" for e in self.edges)
        if len(self.members) > len(self.edges):
            text += "\n    (one cycle of those among " + ", ".join(self.members) + ")"
        return text


def find_cycles(graph: Graph) -> list[Cycle]:
    """One shortest cycle per strongly connected component of more than one module, as the list
    of its edges (the first edge found for each pair of modules)."""
    first: dict[tuple[str, str], Edge] = {}
    for e in graph.edges:
        first.setdefault((e.src, e.dst), e)
    out: dict[str, list[str]] = {m: [] for m in graph.modules}
    for src, dst in first:
        out[src].append(dst)
    cycles = []
    for comp in _sccs(sorted(graph.modules), out):
        if len(comp) < 2:
            continue
        members = set(comp)
        start = comp[0]
        prev: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in prev:       # BFS back to start inside the component
            nxt = []
            for v in frontier:
                for w in out[v]:
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        v = prev[start]
        while v != start:
            path.append(v)
            v = prev[v]
        path.append(start)
        path.reverse()
        cycles.append(Cycle(tuple(comp), tuple(first[(a, b)] for a, b in zip(path, path[1:]))))
    return sorted(cycles, key=lambda c: c.members)


def _entry(module: str, scope: str, flat_ok: bool, packages: set[str]) -> str | None:
    """The scope entry a module lies in (its first name below the scope), or None when it is a
    flat module of a scope that allows none."""
    rest = module[len(scope) + 1:].split(".")
    if len(rest) == 1 and not flat_ok and module not in packages:
        return None
    return rest[0]


def order_violations(graph: Graph, scope: str, order: Sequence[Sequence[str]],
                     flat_ok: bool) -> list[str]:
    """Modules of ``scope`` outside every declared entry, and imports between two modules of
    ``scope`` that run against ``order``, each naming the file (and line)."""
    rank = {name: i for i, names in enumerate(order) for name in names}
    inside = [m for m in graph.modules if m.startswith(scope + ".")]
    problems = []
    for m in inside:
        entry = _entry(m, scope, flat_ok, graph.packages)
        path = graph.modules[m]
        if entry is None:
            problems.append(f"{path}: {m} lies in no declared folder of {scope}")
        elif entry not in rank:
            problems.append(f"{path}: {m} lies in {entry!r}, which the order of {scope} does not "
                            "declare")
    for e in graph.edges:
        if not (e.src.startswith(scope + ".") and e.dst.startswith(scope + ".")):
            continue        # outside the scope, or the scope's own __init__: the cycle check's
        if e.src in graph.packages and e.dst.startswith(e.src + "."):
            continue        # a package's __init__ re-exports its own folder's modules
        a = _entry(e.src, scope, flat_ok, graph.packages)
        b = _entry(e.dst, scope, flat_ok, graph.packages)
        if a is None or b is None or a not in rank or b not in rank or a == b:
            continue        # reported above, or inside one entry (checked by a deeper scope)
        if rank[b] > rank[a]:
            problems.append(f"{e}: {a!r} may not import {b!r}, which comes after it in the "
                            f"order of {scope}")
    return problems


# ---- the checks on gradops ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(ROOT, PACKAGE)


def _touches_train(cycle: Cycle) -> bool:
    return any(m == TRAIN or m.startswith(TRAIN + ".") for m in cycle.members)


@pytest.mark.parametrize("where", ["outside-train", "train"])
def test_no_import_cycles(graph: Graph, where: str) -> None:
    cycles = [c for c in find_cycles(graph) if _touches_train(c) == (where == "train")]
    if cycles:
        pytest.fail("\n".join(str(c) for c in cycles), pytrace=False)


@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_imports_follow_declared_order(graph: Graph, scope: str) -> None:
    package, order, flat_ok = SCOPES[scope]
    problems = order_violations(graph, package, order, flat_ok)
    declared = " -> ".join("/".join(names) for names in order)
    if problems:
        pytest.fail("\n".join(problems + [f"(declared order of {package}: {declared})"]),
                    pytrace=False)


def test_graph_reads_the_package(graph: Graph) -> None:
    """The checks above run on the real graph (no vacuous pass): every module is a node and the
    package's own re-exports and kernels' backend imports are edges."""
    edges = {(e.src, e.dst) for e in graph.edges}
    assert ("gradops", "gradops.ops") in edges
    assert ("gradops.ops.gram", "gradops._backend") in edges
    assert len(graph.modules) == len(list((ROOT / PACKAGE).rglob("*.py")))


# ---- the checker on small synthetic packages ---------------------------------------------------
def _write(base: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text), encoding="utf-8")


def test_checker_finds_cycle_through_function_level_import(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "import os\n\n\ndef f():\n    from .a import thing\n    return thing\n",
    })
    cycles = find_cycles(build_graph(tmp_path, "pkg"))
    assert len(cycles) == 1
    text = str(cycles[0])
    assert "pkg.a -> pkg.b -> pkg.a" in text
    assert "pkg/b.py:5: pkg.b imports pkg.a" in text
    assert "pkg/a.py:1: pkg.a imports pkg.b" in text


def test_checker_submodule_and_type_checking(tmp_path: Path) -> None:
    """``from .x import name`` with ``name`` a submodule is an edge to that submodule; imports
    under ``if TYPE_CHECKING:`` are no edges; a three-module cycle is printed whole."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "",
        "pkg/sub/x.py": "from .. import c\n",
        "pkg/c.py": "import pkg.d as d\n",
        "pkg/d.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from .c import C\nelse:\n    from .sub import x\n"),
    })
    g = build_graph(tmp_path, "pkg")
    assert {(e.src, e.dst) for e in g.edges} == {
        ("pkg.sub.x", "pkg.c"), ("pkg.c", "pkg.d"), ("pkg.d", "pkg.sub.x")}
    (cycle,) = find_cycles(g)
    assert str(cycle).startswith("import cycle pkg.c -> pkg.d -> pkg.sub.x -> pkg.c")


def test_checker_passes_clean_tree(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "from . import low, train\nfrom .train import run\n",
        "pkg/low.py": "import torch\n",
        "pkg/train/__init__.py": "from .engine.loop import Trainer\nfrom .. import low\n",
        "pkg/train/config/__init__.py": "",
        "pkg/train/config/schema.py": "from ...low import x\n",
        "pkg/train/engine/__init__.py": "from .loop import Trainer\n",
        "pkg/train/engine/loop.py": ("from ..config import schema\n\n\ndef f():\n"
                                     "    from ..config.schema import Config\n"),
    })
    g = build_graph(tmp_path, "pkg")
    assert find_cycles(g) == []
    assert order_violations(g, "pkg", (("low",), ("train",)), True) == []
    assert order_violations(g, "pkg.train", (("config",), ("engine",)), False) == []
    assert ("pkg.train.engine.loop", "pkg.train.config.schema") in {
        (e.src, e.dst) for e in g.edges}


def test_checker_finds_backward_import_between_train_folders(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/train/__init__.py": "",
        "pkg/train/flat.py": "",
        "pkg/train/config/__init__.py": "",
        "pkg/train/config/schema.py": "\n\ndef f():\n    from ..engine import loop\n",
        "pkg/train/engine/__init__.py": "",
        "pkg/train/engine/loop.py": "",
    })
    g = build_graph(tmp_path, "pkg")
    assert find_cycles(g) == []
    problems = order_violations(g, "pkg.train", (("config",), ("engine",)), False)
    assert len(problems) == 2
    assert "flat.py: pkg.train.flat lies in no declared folder of pkg.train" in problems[0]
    assert problems[1] == ("pkg/train/config/schema.py:4: pkg.train.config.schema imports "
                           "pkg.train.engine.loop: 'config' may not import 'engine', which comes "
                           "after it in the order of pkg.train")


def test_checker_reads_importlib_calls(tmp_path: Path) -> None:
    """``importlib.import_module`` with a constant name is an edge; an f-string whose constant
    prefix (or ``__name__``) names a package is an edge to it and to every module directly in it;
    a name only known at run time is none."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "",
        "pkg/suites/__init__.py": ("import importlib\n\n\ndef load(name):\n"
                                   "    return importlib.import_module(f'{__name__}.{name}')\n"),
        "pkg/suites/one.py": "",
        "pkg/cli.py": ("import importlib\nfrom importlib import import_module\n\n\n"
                       "def run(suite, other):\n"
                       "    importlib.import_module('pkg.low')\n"
                       "    import_module(f'pkg.suites.{suite}')\n"
                       "    return importlib.import_module(other)\n"),
    })
    g = build_graph(tmp_path, "pkg")
    assert {(e.src, e.dst, e.line) for e in g.edges} == {
        ("pkg.suites", "pkg.suites.one", 5), ("pkg.cli", "pkg.low", 6),
        ("pkg.cli", "pkg.suites", 7), ("pkg.cli", "pkg.suites.one", 7)}
