"""The code blocks of README.md and docs/*.md run (issue 28): every ```python block is executed,
in a fresh namespace, from a temporary working directory, unless the line before it is a marker

    <!-- doc-test: skip (why) -->

(a template or a fragment). A skipped block must still parse unless it is a template (``<op>``),
and its absolute imports are executed, so a renamed module or function breaks the test. A
```bash block runs only when marked ``<!-- doc-test: run -->`` (cheap and safe ones), with
``gradops`` meaning ``python -m gradops`` of this checkout."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*doc-test:\s*(skip|run)\b\s*(.*?)-->")


def doc_files() -> list[Path]:
    """README.md and the committed pages of docs/ (not the generated docs/method/)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path) -> list[tuple[str, int, str, str | None, str]]:
    """``(lang, line, code, marker, reason)`` of each fenced block of ``path``."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARKER.search(before)
        out.append((m.group(1), line, m.group(2), mark.group(1) if mark else None,
                    mark.group(2).strip() if mark else ""))
    return out


def _cases(lang: str) -> list:
    return [pytest.param(p, line, code, mark, why, id=f"{p.relative_to(ROOT)}:{line}")
            for p in doc_files() for (lg, line, code, mark, why) in blocks(p) if lg == lang]


PYTHON_BLOCKS = _cases("python")
BASH_BLOCKS = [c for c in _cases("bash") if c.values[3] == "run"]


def test_there_are_runnable_blocks():
    ran = [c for c in PYTHON_BLOCKS if c.values[3] is None]
    assert len(ran) >= 3, [c.id for c in ran]       # the README's three examples at least


@pytest.mark.parametrize("path,line,code,mark,why", PYTHON_BLOCKS)
def test_python_block(path, line, code, mark, why, tmp_path, monkeypatch):
    where = f"{path.relative_to(ROOT)}:{line}"
    if mark == "run":
        pytest.fail(f"{where}: python blocks run unless marked skip; drop the 'run' marker")
    if mark == "skip":
        assert why, f"{where}: a doc-test skip needs its reason: <!-- doc-test: skip (why) -->"
        try:
            tree = ast.parse(code)
        except SyntaxError:
            assert re.search(r"<\w+>", code), (f"{where}: a skipped block that does not parse "
                                               "must be a template (<name> placeholders)")
            return
        imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                   and not (isinstance(n, ast.ImportFrom) and n.level)]
        exec(compile(ast.Module(imports, []), where, "exec"), {"__name__": "__doc_test__"})
        return
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__doc_test__"})


@pytest.mark.parametrize("path,line,code,mark,why", BASH_BLOCKS)
def test_bash_block(path, line, code, mark, why, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = f'gradops() {{ "{sys.executable}" -m gradops "$@"; }}\nset -e\n{code}'
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (f"{path.relative_to(ROOT)}:{line} exited {r.returncode}:\n"
                               f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
