#!/usr/bin/env bash
# The prepared GPU check: on a machine with a CUDA GPU and the torch / triton it already has (no
# network needed), build gradops' extension there and run every CUDA claim in one go:
#
#   1. env          the device, driver, Python, torch, triton, numpy versions
#   2. build        the extension, CUDA + CPU kernels, for this device's architecture
#   3. copy_bw      the device's measured copy bandwidth (the yardstick of the ops' GB/s)
#   4. pytest_gpu   pytest -m gpu: every CUDA case of the test suite
#   5. ops_fp32     gradops bench --suite all (gram, segment_gram, combine, pcgrad, graddrop):
#   6. ops_bf16       T = 2, 8, 40 at a size that fills HBM bandwidth, fp32 and bf16
#   7. mtl_mlp      gradops bench --suite mtl: step / floor ratios, MLP encoder (TorchJD beside
#   8. mtl_cnn        where installed) and CNN encoder
#   9. compare      gradops compare --budget quick on the GPU (the trainer end to end)
#  10. mtl_memory   gradops bench --suite mtl --memory: peak memory per step in copies of J
#  11. info         gradops info: which backend each op takes on this machine
#
# Each step runs under its own time limit and the next one runs whatever the last one did; the
# whole check stops starting steps when its budget (GPU_CHECK_BUDGET seconds, default 460: under
# 8 minutes with the summary) is spent, and says so. Everything goes under one folder:
#   $OUT (when set, as on the lent GPU machines) or --out DIR (default gpu-check-out/):
#     summary.md          pass / fail / time per step, the test counts and failures, the headline
#                         figures (ops' GB/s and fraction of the copy bandwidth, MTL step ratios)
#     ops.csv, mtl.csv, mtl_memory.csv, pytest-gpu.xml   the raw results (device name inside)
#     gpu-check.tar.gz    every log and file of every step
#
# --dry-run runs the same steps on the CPU at tiny sizes (Triton under TRITON_INTERPRET=1, the
# extension reused when it is already built, limits five times longer and a 1800 s budget for a
# shared 2-core machine), so that this script is tested in CI (tests/test_gpu_check.py) and
# cannot rot between GPU leases.
#
# Python: $PYTHON, default python3 (on the GPU machines the one that holds torch). Packages the
# tests need and a machine lacks (torchjd, expecttest) can be brought as wheels in .whl/
# (scripts/gpu-wheels.sh downloads them here); they are installed into a temporary folder, never into the
# machine's Python.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
OUT_DIR=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) shift; OUT_DIR=${1:-} ;;
    --out=*) OUT_DIR=${1#--out=} ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUT_DIR" ]; then OUT_DIR=gpu-check-out; fi
mkdir -p "$OUT_DIR" || { echo "gpu-check: cannot create --out $OUT_DIR" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then
  # a shared 2-core CI machine is slower than the GPU machine's 16 cores: longer limits
  SCALE=5; BUDGET=${GPU_CHECK_BUDGET:-1800}
else
  SCALE=1; BUDGET=${GPU_CHECK_BUDGET:-460}
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gradops-gpu-check.XXXXXX")
START=$(date +%s)
STEPS="$WORK/steps.tsv"
printf 'step\tstatus\tseconds\tlimit\tcommand\n' > "$STEPS"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  DEV=cpu
else
  DEV=cuda
fi

# Wheels brought along (.whl/*.whl), installed into a temporary folder.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl > "$WORK/wheels.log" 2>&1 \
    && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

# step NAME LIMIT_S COMMAND...: run COMMAND under min(LIMIT_S, what is left of the budget), its
# output in $WORK/NAME.log, and a row in steps.tsv (pass, fail (exit N), timeout, not run).
step() {
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local now left status rc t0
  now=$(date +%s)
  left=$(( BUDGET - (now - START) - 15 ))
  if [ "$left" -lt 10 ]; then
    printf '%s\tnot run (budget spent)\t0\t%s\t%s\n' "$name" "$limit" "$*" >> "$STEPS"
    echo "gpu-check: $name not run: the budget of ${BUDGET}s is spent"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "gpu-check: $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=pass ;;
    124|137) status=timeout ;;
    *) status="fail (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit" "$*" \
    >> "$STEPS"
  echo "gpu-check: $name: $status in $(( $(date +%s) - t0 ))s"
}

step env 60 bash -c "nvidia-smi || echo 'nvidia-smi: not available'; \
  \"$PY\" \"$ROOT/scripts/gpu_check.py\" env"

if [ "$DRY" = 1 ]; then
  # the extension as set up by scripts/setup.sh; built (CPU kernels) only where it is missing
  step build 180 bash -c "\"$PY\" -c 'import gradops._C' 2>/dev/null \
    && echo 'extension already built: reused (dry run)' \
    || GRADOPS_NO_CUDA=1 MAX_JOBS=2 \"$PY\" setup.py build_ext --inplace"
else
  ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" \
         2>/dev/null || echo "9.0")
  step build 240 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace
fi

step copy_bw 60 "$PY" "$ROOT/scripts/gpu_check.py" copy-bw --device "$DEV" \
  --out "$WORK/copy_bw.json" $([ "$DRY" = 1 ] && echo --small)

if [ "$DRY" = 1 ]; then
  # no CUDA device: every gpu-marked case is collected and reported as skipped
  step pytest_gpu 60 "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider \
    --junitxml="$WORK/pytest-gpu.xml" tests
else
  XDIST=""
  "$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
  step pytest_gpu 200 "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider $XDIST \
    --junitxml="$WORK/pytest-gpu.xml" tests
fi

if [ "$DRY" = 1 ]; then
  SIZE=(--P 4096 --T 2,8 --rounds 3 --budget 0.2)
  MTL=(--quick --T 3 --methods ew,pcgrad,mgda --rounds 2 --budget 0.5)
  MEM=(--quick --T 3 --methods pcgrad)
else
  SIZE=(--P 4194304 --T 2,8,40 --rounds 10 --budget 2)
  MTL=(--T 3,8,40 --rounds 10 --budget 3)
  MEM=(--T 3,8,40)
fi
step ops_fp32 60 "$PY" -m gradops bench --suite all --device "$DEV" --dtype fp32 \
  --no-pair-loops "${SIZE[@]}" --csv "$WORK/ops.csv"
step ops_bf16 45 "$PY" -m gradops bench --suite all --device "$DEV" --dtype bf16 \
  --no-pair-loops "${SIZE[@]}" --csv "$WORK/ops.csv" --append
step mtl_mlp 75 "$PY" -m gradops bench --suite mtl --device "$DEV" --encoder mlp \
  "${MTL[@]}" --csv "$WORK/mtl.csv"
step mtl_cnn 60 "$PY" -m gradops bench --suite mtl --device "$DEV" --encoder cnn \
  "${MTL[@]}" --csv "$WORK/mtl.csv" --append
step compare 60 "$PY" -m gradops compare --device "$DEV" --budget quick --overwrite \
  --no-progress --out "$WORK/compare"
step mtl_memory 45 "$PY" -m gradops bench --suite mtl --memory --device "$DEV" "${MEM[@]}" \
  --csv "$WORK/mtl_memory.csv"
step info 30 "$PY" -m gradops info

"$PY" "$ROOT/scripts/gpu_check.py" summary "$WORK" --dry-run "$DRY" \
  --elapsed "$(( $(date +%s) - START ))" --budget "$BUDGET" > "$OUT_DIR/summary.md" \
  2> "$WORK/summary.log" || {
    echo "gpu-check: the summary failed (see summary.log in the archive)" >&2
    cp "$STEPS" "$OUT_DIR/steps.tsv"
  }
for f in ops.csv mtl.csv mtl_memory.csv pytest-gpu.xml; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT_DIR/$f"
done
tar czf "$OUT_DIR/gpu-check.tar.gz" -C "$WORK" . 2>/dev/null
rm -rf "$WORK"
echo "gpu-check: done in $(( $(date +%s) - START ))s; summary: $OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md" 2>/dev/null | head -60
# exit 0 when every step passed, 1 otherwise (the summary says which)
grep -q '| fail\|| timeout\|| not run' "$OUT_DIR/summary.md" 2>/dev/null && exit 1
[ -f "$OUT_DIR/summary.md" ] || exit 1
exit 0
