#!/usr/bin/env bash
# The seed-method measurements on a CUDA machine, in parallel processes (run from the repository
# root; installs nothing, uses src/ through PYTHONPATH):
#   * ResNet-18 / full Fashion-MNIST, 10 epochs, 95 %, bf16: gmp, linbreg, adabreg, halo, xrda
#     (benchmarks/conv_nets.py --preset gpu, one process per method);
#   * the sweep: every built-in model × seed method × 90/95/98 % on the quick budget
#     (benchmarks/conv_nets.py --preset sweep, one process per model);
#   * the README tables: LeNet-5 (10 epochs) and LeNet-300-100 (20 epochs), 3 seeds, 90/95/98 %,
#     one `sparsetrain compare` per method variant and target, merged into one compare per variant set.
# Everything lands in $OUT/seed_methods.tgz (+ seed_methods.md, the tables as text).
#   bash scripts/gpu_seed_methods.sh [LIMIT_SECONDS] [PARALLEL]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
DATA=${DATA_DIR:-.data/fashion-mnist}
LIMIT=${1:-230}
PAR=${2:-24}
W=$(mktemp -d)
mkdir -p "$OUT" "$W/logs"
ST="$PY -m sparsetrain"
jobs_file="$W/jobs.txt"
: > "$jobs_file"
for m in gmp linbreg adabreg halo xrda; do
  echo "$PY benchmarks/conv_nets.py --preset gpu --methods $m --data-dir $DATA --device cuda --precision bf16 --out $W/r18-$m > $W/logs/r18-$m.log 2>&1" >> "$jobs_file"
done
for model in lenet300 mlp-bregman lenet5 convnet vgg16 resnet18 resnet20 resnet56; do
  echo "$PY benchmarks/conv_nets.py --preset sweep --models $model --data-dir $DATA --device cuda --out $W/sweep > $W/logs/sweep-$model.log 2>&1" >> "$jobs_file"
done
# variant name -> method, targets and --set overrides (the README tables, at the current defaults)
variants=(
  "dense|dense|0.9|" "gmp|gmp|0.9 0.95 0.98|" "xrda|xrda|0.9 0.95 0.98|"
  "linbreg|linbreg|0.9 0.95 0.98|" "adabreg|adabreg|0.9 0.95 0.98|" "halo|halo|0.9 0.95 0.98|"
)
for model_epochs in lenet5:10 lenet300:20; do
  model=${model_epochs%%:*}; epochs=${model_epochs##*:}
  for v in "${variants[@]}"; do
    IFS='|' read -r name method targets sets <<< "$v"
    for t in $targets; do
      echo "$ST compare --methods $method --model $model --sparsity $t --epochs $epochs --seeds 3 --data-dir $DATA --device cuda $sets --out $W/tables/$model/$name-$t > $W/logs/$model-$name-$t.log 2>&1" >> "$jobs_file"
    done
  done
done
if [ "${DRY:-0}" = 1 ]; then    # a CPU check of the script: a few jobs, tiny budgets
  grep -E "sweep --models lenet300|lenet5-(linbreg|halo)-0.98" "$jobs_file" | sed 's/--device cuda/--device cpu/; s/--epochs [0-9]*/--epochs 1 --train-subset 256 --test-subset 128/; s/--seeds 3/--seeds 1/; s/--precision bf16//' > "$jobs_file.dry"
  mv "$jobs_file.dry" "$jobs_file"
fi
echo "$(wc -l < "$jobs_file") jobs, $PAR at a time, limit ${LIMIT}s"
timeout --kill-after=5 "$LIMIT" xargs -P "$PAR" -I CMD bash -c CMD < "$jobs_file"
echo "jobs done (rc=$?) after ${SECONDS}s"
( cd "$W" && tar czf "$OUT/seed_methods.tgz" --exclude='*.pt' logs tables r18-* sweep 2>/dev/null )
cat "$W"/r18-*/conv_nets.md "$W"/sweep/conv_nets-*.md > "$OUT/seed_methods.md" 2>/dev/null
for f in "$W"/tables/*/*/results.md; do echo "## ${f#$W/}"; grep "^| [a-z]" "$f" | head -3; done >> "$OUT/seed_methods.md" 2>/dev/null
grep -h "^|" "$OUT/seed_methods.md" | grep -c . ; grep -l "Traceback" "$W"/logs/*.log | head
