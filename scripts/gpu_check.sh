#!/usr/bin/env bash
# The GPU checks of the speed work (fused Triton optimizer steps, mixed precision, 2:4 sparsity), in
# one short run (≤ 7 minutes): run from the repository root on a CUDA machine with torch + triton
# installed. Installs nothing: the package is used from src/ (PYTHONPATH=src).
#
#   bash scripts/gpu_check.sh             # results in $OUT (default ./gpu_out)
#   bash scripts/gpu_check.sh --dry-run   # the same parts on the CPU with tiny sizes (a script check)
#
# Fashion-MNIST is read from $DATA_DIR (default .data/fashion-mnist; the dry run falls back to
# /usr/share/datasets/fashion-mnist). Every part runs under `timeout` and writes OUT/NAME.txt as it
# finishes; OUT/summary.txt lists each part's exit code and seconds. The whole run stops starting
# parts when $BUDGET seconds (default 420) are spent.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DATA=${DATA_DIR:-.data/fashion-mnist}
BUDGET=${BUDGET:-420}
START=$(date +%s)
: > "$OUT/summary.txt"

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  [ -e "$DATA/train-images-idx3-ubyte.gz" ] || DATA=/usr/share/datasets/fashion-mnist
else
  DEVICE=cuda
fi

# part NAME LIMIT_SECONDS COMMAND...: run under timeout (cut to what the budget has left), output to
# OUT/NAME.txt, one line in OUT/summary.txt
part() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    echo "$name: skipped (budget spent)" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - t0 ))s$([ $rc = 124 ] && echo ' (timed out)')" | tee -a "$OUT/summary.txt"
  tail -n 60 "$OUT/$name.txt"
}

env_info() {
  nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
from sparsetrain.optim import fused_cuda
print("fused steps available:", fused_cuda.available())
EOF
}

nm_accuracy() {   # 2:4 GMP vs unstructured 50 % GMP on LeNet-300-100 (same seed, same budget)
  local epochs=10 extra=()
  [ "$DRY" = 1 ] && epochs=1 && extra=(--train-subset 512 --test-subset 200)
  for pattern in none 2:4; do
    local pflag=()
    [ "$pattern" != none ] && pflag=(--pattern "$pattern")
    echo "--- gmp, sparsity 0.5, pattern $pattern"
    "$PY" -m sparsetrain train --method gmp --model lenet300 --data-dir "$DATA" --device "$DEVICE" \
      --epochs "$epochs" --sparsity 0.5 --no-progress --json "${pflag[@]}" "${extra[@]}" \
      > "$OUT/nm_${pattern/:/of}.json" || return 1
    "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s.get(k) for k in ('test_accuracy', 'sparsity', 'pattern', 'pattern_removed', 'epoch_seconds')})" "$OUT/nm_${pattern/:/of}.json"
  done
  "$PY" - "$OUT/nm_none.json" "$OUT/nm_2of4.json" <<'EOF'
import json, sys
a, b = (json.load(open(p))["test_accuracy"] for p in sys.argv[1:])
print(f"unstructured 50 %: {100 * a:.2f} %   2:4: {100 * b:.2f} %   difference {100 * (b - a):+.2f} points "
      f"({'within' if a - b <= 0.005 else 'NOT within'} 0.5 points)")
EOF
}

export DRY OUT PY DATA DEVICE
export -f env_info nm_accuracy     # run by `timeout ... bash -c NAME`
part env 30 bash -c env_info
if [ "$DRY" = 1 ]; then
  part tests 150 "$PY" -m pytest -q -m cuda --maxfail=10 -rs tests/test_fused_cuda.py tests/test_precision.py \
    tests/test_nm.py
  part step_time 75 "$PY" benchmarks/step_time.py --device cpu --only lenet --repeats 2 --match ProxSGD
  part inference 45 "$PY" benchmarks/inference.py --gpu-shapes-only --repeats 2
  part nm_accuracy 60 bash -c nm_accuracy
  part epoch_time 140 "$PY" benchmarks/epoch_time.py --device cpu --model lenet300 --data-dir "$DATA" \
    --methods dense,xrda --precisions fp32,bf16 --train-subset 256 --test-subset 64 --out "$OUT"
else
  part tests 150 "$PY" -m pytest -q -m cuda --maxfail=10 -rs tests/test_fused_cuda.py tests/test_precision.py \
    tests/test_nm.py
  part step_time 75 "$PY" benchmarks/step_time.py --device cuda --repeats 20
  part inference 45 "$PY" benchmarks/inference.py --device cuda --repeats 30
  part nm_accuracy 60 bash -c nm_accuracy
  part epoch_time 140 "$PY" benchmarks/epoch_time.py --device cuda --model resnet18 --data-dir "$DATA" \
    --train-subset 10000 --test-subset 1000 --epochs 2 --out "$OUT"
  # the same ResNet-18 step times through the torch path, for the before/after on this card
  part step_time_torch_path 45 env SPARSETRAIN_FUSED=off "$PY" benchmarks/step_time.py --device cuda \
    --only resnet18 --repeats 10
fi
echo "total $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
