#!/usr/bin/env bash
# Build the documentation site into site/ (open site/index.html), strictly: any warning, broken
# cross-reference or broken link between pages fails the build (sphinx -W --keep-going -n), from
# a fresh environment (-E) every time.
#
#   bash scripts/docs.sh            (after bash scripts/setup.sh: uses .venv)
#
# Installs the pinned tools of requirements-docs.txt into the project venv first (a no-op when
# they are there). Environment: PYTHON (default .venv/bin/python), GRADOPS_DOCS_NO_INSTALL=1
# (skip the install: the tools are already importable).
# The method pages (docs/method/) are generated from the method registry during the build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ] && ! command -v "$PY" > /dev/null; then
  echo "docs: no interpreter at $PY (run bash scripts/setup.sh first, or set PYTHON)" >&2
  exit 2
fi
if [ "${GRADOPS_DOCS_NO_INSTALL:-0}" != 1 ]; then
  "$PY" -m pip install -q -r requirements-docs.txt
fi
rm -rf site build/docs-doctrees
start=$(date +%s)
"$PY" -m sphinx -b html -E -W --keep-going -n -q -d build/docs-doctrees docs site
echo "docs: site/index.html built in $(( $(date +%s) - start )) s"
