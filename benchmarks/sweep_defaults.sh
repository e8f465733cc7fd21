#!/usr/bin/env bash
# The measurements behind GpreBN's default settings (README "Defaults and why"): learning rate, optimizer,
# statistics momentum/theta/order and freeze mode, on the hardest built-in domains at batches 64, 4 and 1.
# Writes benchmarks/results/sweeps/*.json|md. About 30 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
D=gaussian_noise,shot_noise,impulse_noise,speckle_noise,fog,contrast,style
common=(--methods gprebn --domains "$D" --severities 5 --batch-sizes 64,4,1 --n-calib 2000 --n-test 2000)
run() { name=$1; shift; "$PY" benchmarks/accuracy.py "${common[@]}" "$@" --out "benchmarks/results/sweeps/$name" >/dev/null; echo "done $name"; }
run lr1e-3 --lr 1e-3
run lr3e-3 --lr 3e-3
run lr3e-4 --lr 3e-4
run lr1e-3-noscale --lr 1e-3 --lr-scaling none
run lr1e-3-direct --lr 1e-3 --freeze direct
run lr1e-3-ema0.1 --lr 1e-3 --momentum 0.1 --stats-init source
run lr1e-3-after --lr 1e-3 --stats-order after
run lr1e-3-theta0.8 --lr 1e-3 --theta 0.8
