#!/usr/bin/env bash
# Download, on this machine (which reaches PyPI), the pure-Python wheels that the GPU machines
# lack and the GPU check's tests use (torchjd for the peer comparisons, expecttest for opcheck),
# into .whl/ (ignored by git). scripts/gpu-check.sh installs whatever .whl/ holds into a temporary
# folder on the GPU machine; carry .whl with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl torchjd==0.18.0 expecttest
ls -la .whl
