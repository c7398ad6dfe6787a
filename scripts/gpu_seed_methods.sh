#!/usr/bin/env bash
# The GPU part of the seed-method checks (run from the repository root on a CUDA machine; installs
# nothing, uses src/ through PYTHONPATH). Two jobs side by side, each under `timeout`:
#   1. ResNet-18 / full Fashion-MNIST, 10 epochs, 95 %: gmp, linbreg, adabreg, halo, xrda, one process
#      each (benchmarks/conv_nets.py --preset gpu), bf16 autocast;
#   2. the sweep: every built-in model × seed method × 90/95/98 % on the quick budget, one process
#      per model (benchmarks/conv_nets.py --preset sweep).
# Results: $OUT/seed_methods.md (every table), logs in $OUT/logs/.
#   bash scripts/gpu_seed_methods.sh [LIMIT_SECONDS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT/logs"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
DATA=${DATA_DIR:-.data/fashion-mnist}
LIMIT=${1:-300}
work=$(mktemp -d)
pids=()
for m in gmp linbreg adabreg halo xrda; do
  timeout "$LIMIT" "$PY" benchmarks/conv_nets.py --preset gpu --methods "$m" --data-dir "$DATA" --device cuda \
    --precision bf16 --out "$work/r18-$m" > "$OUT/logs/r18-$m.log" 2>&1 &
  pids+=($!)
done
for model in lenet300 mlp-bregman lenet5 convnet vgg16 resnet18 resnet20 resnet56; do
  timeout "$LIMIT" "$PY" benchmarks/conv_nets.py --preset sweep --models "$model" --data-dir "$DATA" \
    --device cuda --out "$work/sweep" > "$OUT/logs/sweep-$model.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
cat "$work"/r18-*/conv_nets.md "$work"/sweep/conv_nets-*.md > "$OUT/seed_methods.md" 2>/dev/null
cat "$OUT/seed_methods.md"
grep -h "Traceback\|Error" "$OUT"/logs/*.log | sort | uniq -c | head -20
