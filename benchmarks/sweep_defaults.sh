#!/usr/bin/env bash
# The measurements behind GpreBN's default settings (README "Defaults and why"): optimizer and learning
# rate, learning-rate scaling, statistics momentum/theta/order and freeze mode, on the hardest built-in
# domains plus clean, at calibration batches 64, 4 and 1. Writes benchmarks/results/sweeps/*.json|md.
# About 30 minutes on 2 cores. Pass config names to run only those, e.g. `sweep_defaults.sh sgd0.1`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
D=clean,gaussian_noise,shot_noise,impulse_noise,speckle_noise,fog,contrast,style
common=(--methods gprebn --domains "$D" --severities 5 --batch-sizes 64,4,1 --n-calib 2000 --n-test 2000)
declare -A configs=(
  [adam1e-3]="--optimizer adam --lr 1e-3"
  [adam5e-3]="--optimizer adam --lr 5e-3"
  [adam2e-2]="--optimizer adam --lr 2e-2"
  [sgd0.05]="--optimizer sgd --lr 0.05"
  [sgd0.1]="--optimizer sgd --lr 0.1"
  [sgd0.2]="--optimizer sgd --lr 0.2"
  [sgd0.1-noscale]="--optimizer sgd --lr 0.1 --lr-scaling none"
  [sgd0.1-direct]="--optimizer sgd --lr 0.1 --freeze direct"
  [sgd0.1-ema0.1]="--optimizer sgd --lr 0.1 --momentum 0.1 --stats-init source"
  [sgd0.1-after]="--optimizer sgd --lr 0.1 --stats-order after"
  [sgd0.1-theta0.8]="--optimizer sgd --lr 0.1 --theta 0.8"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(adam1e-3 adam5e-3 adam2e-2 sgd0.05 sgd0.1 sgd0.2 sgd0.1-noscale sgd0.1-direct sgd0.1-ema0.1 sgd0.1-after sgd0.1-theta0.8)
for name in "${names[@]}"; do
  # shellcheck disable=SC2086
  "$PY" benchmarks/accuracy.py "${common[@]}" ${configs[$name]} --out "benchmarks/results/sweeps/$name" >/dev/null
  echo "done $name"
done
