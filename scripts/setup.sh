#!/usr/bin/env bash
# Set up gradops on a fresh machine: a Python venv with the pinned dependencies, and the package
# installed in editable mode with its compiled extension (C++ CPU kernels; CUDA kernels when nvcc
# is present). Idempotent: the venv is cached outside the checkout, keyed on requirements-dev.txt,
# and reused when present; the extension is rebuilt every time (ninja makes that cheap).
#
# Afterwards `.venv/` in the checkout points at the venv:
#   .venv/bin/gradops bench        (the main job)
#   .venv/bin/python -m pytest     (the tests)
#
# Environment: GRADOPS_VENV (venv path), PYTHON (interpreter, default python3), GRADOPS_NO_EXT=1,
# GRADOPS_NO_CUDA=1, TORCH_CUDA_ARCH_LIST, MAX_JOBS (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
key=$( (cat requirements-dev.txt; "$PY" --version 2>&1) | sha256sum | cut -c1-12)
VENV=${GRADOPS_VENV:-$HOME/.cache/gradops/venv-$key}

if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
  echo "gradops setup: creating $VENV (torch is a large install: a few minutes)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
  touch "$VENV/.complete"
else
  echo "gradops setup: reusing $VENV"
fi
ln -sfn "$VENV" .venv

echo "gradops setup: building the extension (MAX_JOBS=${MAX_JOBS:-2})"
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/gradops" info
