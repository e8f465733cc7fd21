"""How much resident memory an onnxruntime CPU session keeps after running a batch (issue 17): the figure
behind the loop's RUNNER_BATCH (a round's onnxruntime calls take 4 frames at a time). Each batch size runs in
a fresh process: load the ONNX file (1 intra-op thread), run the batch twice, and read the process's resident
memory before loading, after loading and after the runs, and its peak.

    gprebn-edge export lite0.safetensors --model examples/efficientnet_lite0.py:make_model --onnx lite0.onnx
    python benchmarks/ort_arena.py lite0.onnx --batches 1 4 8 16 32 64
Writes benchmarks/results/ort_arena.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, environment, publish  # noqa: E402


def child(path: str, batch: int) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    from gprebn_edge.runtime.environment import peak_resident_memory, resident_memory

    base = resident_memory() or 0
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    loaded = resident_memory() or 0
    shape = [d if isinstance(d, int) else batch for d in session.get_inputs()[0].shape]
    shape[0] = batch
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(2):
        session.run(None, {session.get_inputs()[0].name: x})
    return {"batch": batch, "load_mb": (loaded - base) / 1e6, "after_run_mb": ((resident_memory() or 0) - base) / 1e6,
            "peak_mb": (peak_resident_memory() or 0) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--out", type=Path, default=RESULTS / "ort_arena")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(str(args.onnx), args.child)))
        return
    if not args.onnx.is_file():
        sys.exit(f"{args.onnx}: no such file (export one with `gprebn-edge export`)")
    rows = []
    for b in args.batches:
        out = subprocess.run([sys.executable, __file__, str(args.onnx), "--child", str(b)], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"batch {b}: {rows[-1]['after_run_mb']:.0f} MB kept", file=sys.stderr, flush=True)
    lines = ["# onnxruntime CPU session: memory kept after a batch (issue 17)", "",
             f"Command: `{command_line()}`", "",
             "Fresh process per batch size, 1 intra-op thread, two runs of one random batch; MB over the process "
             "before the session was made.", "",
             "| batch | session loaded (MB) | after the runs (MB) | per frame (MB) | process peak (MB) |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        per = (r["after_run_mb"] - r["load_mb"]) / r["batch"]
        cells = (r["batch"], f"{r['load_mb']:.0f}", f"{r['after_run_mb']:.0f}", f"{per:.1f}", f"{r['peak_mb']:.0f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    publish(args.out, {"command": command_line(), "environment": environment(), "onnx": str(args.onnx),
                       "rows": rows}, lines)


if __name__ == "__main__":
    main()
