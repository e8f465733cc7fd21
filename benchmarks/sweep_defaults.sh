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
  [adam1e-3-sqrt]="--optimizer adam --lr 1e-3 --lr-scaling sqrt"
  [adam1e-3-linear]="--optimizer adam --lr 1e-3 --lr-scaling linear"
  [adam1e-3-none]="--optimizer adam --lr 1e-3 --lr-scaling none"
  [adam5e-3-sqrt]="--optimizer adam --lr 5e-3 --lr-scaling sqrt"
  [sgd0.1-linear]="--optimizer sgd --lr 0.1 --lr-scaling linear"
  [adam1e-3-sqrt-direct]="--lr-scaling sqrt --freeze direct"
  [adam1e-3-sqrt-ema0.1]="--lr-scaling sqrt --momentum 0.1 --stats-init source"
  [adam1e-3-sqrt-after]="--lr-scaling sqrt --stats-order after"
  [adam1e-3-sqrt-theta0.8]="--lr-scaling sqrt --theta 0.8"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${!configs[@]}")
for name in "${names[@]}"; do
  # shellcheck disable=SC2086
  "$PY" benchmarks/accuracy.py "${common[@]}" ${configs[$name]} --out "benchmarks/results/sweeps/$name" >/dev/null
  echo "done $name"
done
