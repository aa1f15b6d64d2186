#!/usr/bin/env bash
# Test gradops against the oldest supported torch / triton pair (scripts/oldest-env.txt: torch
# 2.11, triton 3.6, the versions of the GPU machines this project uses) on the CPU:
#   - a venv of its own, cached outside the checkout and keyed on oldest-env.txt;
#   - a copy of the tracked files in a temporary folder, the extension built there against that
#     torch (CPU kernels only: the CUDA kernels are compiled by scripts/setup.sh in the main
#     build, and their ABI does not depend on the pair), so the main checkout's build is untouched;
#   - the whole test suite there (the C++ and torch paths, opcheck, torch.compile, the Triton
#     interpreter, the trainer's quick compare), except tests/test_gpu_check.py (the GPU check's
#     dry run, already run by the main suite).
# Extra arguments go to pytest. Environment: PYTHON (default python3), GRADOPS_OLDEST_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
key=$( (cat scripts/oldest-env.txt; "$PY" --version 2>&1) | sha256sum | cut -c1-12)
VENV=${GRADOPS_OLDEST_VENV:-$HOME/.cache/gradops/venv-oldest-$key}
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
  echo "test-oldest: creating $VENV"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r scripts/oldest-env.txt
  touch "$VENV/.complete"
else
  echo "test-oldest: reusing $VENV"
fi
"$VENV/bin/python" -c "import torch, triton, numpy; print('test-oldest: torch', \
torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gradops-oldest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
git ls-files -z | xargs -0 tar cf - | tar xf - -C "$WORK"
cd "$WORK"
echo "test-oldest: building the extension (CPU kernels) against that torch"
GRADOPS_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace \
  > build.log 2>&1 || { tail -40 build.log; echo "test-oldest: build failed"; exit 1; }
# GRADOPS_NO_CUDA=1: the tests then know the CUDA kernels were left out on purpose
GRADOPS_NO_CUDA=1 PYTHONPATH=$WORK "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  --ignore tests/test_gpu_check.py "$@" tests
