"""README.md's method table is the registry's (scripts/method_table.py; issue 28)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("method_table", ROOT / "scripts" / "method_table.py")
method_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(method_table)


def test_readme_table_is_the_registry():
    assert method_table.main(["--check", str(ROOT / "README.md")]) == 0, (
        "README.md's method table differs from the registry: run "
        "`python scripts/method_table.py --write README.md`")


def test_every_registered_method_is_a_row():
    from gradops.weighting import all_methods

    _, table, _ = method_table.split((ROOT / "README.md").read_text(encoding="utf-8"), "README")
    names = [row.split("|")[2].strip().strip("`") for row in table.splitlines()[2:]]
    assert names == [cls.name for cls in all_methods()]


def test_check_fails_on_a_stale_table_and_write_fixes_it(tmp_path, capsys):
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    head, table, tail = method_table.split(text, "README")
    readme.write_text(head + "\n".join(table.splitlines()[:-1]) + tail, encoding="utf-8")
    assert method_table.main(["--check", str(readme)]) == 1
    assert "differs from the registry" in capsys.readouterr().err
    assert method_table.main(["--write", str(readme)]) == 0
    assert method_table.main(["--check", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == text


def test_missing_markers_are_an_error(tmp_path, capsys):
    bad = tmp_path / "README.md"
    bad.write_text("# no table here\n", encoding="utf-8")
    assert method_table.main(["--check", str(bad)]) == 2
    assert "expected one line" in capsys.readouterr().err
