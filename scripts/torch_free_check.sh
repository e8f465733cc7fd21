#!/usr/bin/env bash
# The serving part without PyTorch (issue 11): install gprebn-edge without its `adapt` extra into a fresh
# venv, check that torch is absent there, then run bench, compare, a serve-only loop and loop-report on ONNX
# files exported beforehand with the full install (.venv, `make`). Prints every command and its output.
#
#     bash scripts/torch_free_check.sh [VENV_DIR] [WORK_DIR]      # ~2 minutes once the wheels are cached
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-/tmp/gprebn-torchfree}
work=${2:-$(mktemp -d)}
mkdir -p "$work"
full="$repo/.venv/bin/gprebn-edge"
[ -x "$full" ] || { echo "run 'make test' (or make demo) first: the ONNX files are exported with .venv" >&2; exit 1; }

run() { echo "\$ $*"; "$@"; echo "[exit $?]"; echo; }

echo "# exported with the full install (.venv)"
"$full" adapt --model builtin:small_resnet --data synthetic:fog:5:n=256 -o "$work/a.safetensors" >/dev/null
"$full" export "$work/a.safetensors" --onnx "$work/a.onnx" >/dev/null
"$full" export "$work/a.safetensors" --onnx "$work/a-unadapted.onnx" --unadapted >/dev/null

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "$repo"       # no [adapt]: no torch
tf="$venv/bin/gprebn-edge"
cd "$work"
run "$venv/bin/python" -c "import importlib.util as u; print('torch importable:', u.find_spec('torch') is not None)"
run "$tf" bench a.onnx --batch 1,32 --duration 2
run "$tf" compare a-unadapted.onnx a.onnx --data synthetic:fog:5:n=500:split=test --latency-iters 30
run "$tf" loop --onnx a.onnx --state st --source stream --frames 2000
run "$tf" loop-report st/metrics.jsonl
run "$tf" info a.onnx
set +e
run "$tf" adapt --model builtin:small_resnet --data synthetic:fog:5:n=64 -o b.safetensors
run "$tf" loop --model a.safetensors --state st2 --source stream --frames 100
