"""Fault injection for the device loop: SIGKILL it at random moments and check, after every kill, that the
state folder is readable and servable and that a restart resumes; at the end, check from the metrics log
that no candidate that failed its gates was ever served.

The loop runs in a child process (this script with --child) on the built-in shifting stream, paced at
--fps, with strict agreement gates so that both passing and failing candidates occur. Each kill lands at a
uniformly random time in [--min-wait, --max-wait] seconds after the child started (so kills fall during
start-up, serving, adaptation rounds, exports and state writes alike).

    python benchmarks/loop_faults.py                 # 20 kills, ~2 minutes on 2 cores
    python benchmarks/loop_faults.py --kills 3 --out /tmp/faults
Writes benchmarks/results/loop_faults.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STREAM = "stream"  # the default shifting stream: 6 segments x 1000 frames


def child(state: Path, start: Path, fps: float) -> None:
    from gprebn_edge.device.gates import GateConfig
    from gprebn_edge.device.loop import LoopConfig, run_loop

    strict = GateConfig(min_agreement=0.9, min_kappa=0.9)  # rejects candidates that change many predictions
    run_loop(LoopConfig(state=state, source=STREAM, model=start, every=250, buffer=384, fps=fps, window=100,
                        gates=strict, recovery=2))


def check_servable(state_dir: Path) -> dict:
    """Read state.json, load the serving ONNX with onnxruntime and run one frame; load the checkpoint."""
    import numpy as np

    from gprebn_edge.checkpoint import load_checkpoint
    from gprebn_edge.device.state import StateDir
    from gprebn_edge.runtime.loading import open_runner

    state = StateDir(state_dir).read()
    if state is None:
        return {"state": None}
    with open_runner(state_dir / state.onnx, "onnxruntime") as runner:
        shape = [int(d) if isinstance(d, int) else 1 for d in runner.inputs()[0].shape]
        logits = runner.infer(np.zeros(shape, dtype=np.float32))
    load_checkpoint(state_dir / state.checkpoint)
    return {"state": state.to_dict(), "finite": bool(np.isfinite(logits).all())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--min-wait", type=float, default=1.0)
    ap.add_argument("--max-wait", type=float, default=8.0)
    ap.add_argument("--fps", type=float, default=60.0, help="frame rate while kills happen")
    ap.add_argument("--final-fps", type=float, default=600.0, help="frame rate of the last run, to the end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.start, args.fps)
        return

    from _common import RESULTS, command_line, environment, publish

    from gprebn_edge.adaptation import AdaptConfig, adapt_to_file
    from gprebn_edge.device.report import read_log, summarize

    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = folder / "start.safetensors"
        adapt_to_file("builtin:small_resnet", "synthetic:clean:n=256", start, AdaptConfig(batch_size=64))
        state = folder / "state"
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        for k in range(args.kills + 1):
            final = k == args.kills
            fps = args.final_fps if final else args.fps
            cmd = [sys.executable, __file__, "--child", str(state), "--start", str(start), "--fps", str(fps)]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            wait = None if final else rng.uniform(args.min_wait, args.max_wait)
            t0 = time.perf_counter()
            try:
                proc.wait(timeout=wait)
                killed = False
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = True
            stderr = proc.stderr.read() if proc.stderr else ""
            row = {"run": k, "killed": killed, "after_s": round(time.perf_counter() - t0, 2),
                   "returncode": proc.returncode, "stderr": stderr.strip().splitlines()[-1:] if stderr else []}
            try:
                row.update(check_servable(state))
                row["servable"] = row.get("state") is not None and row.get("finite", False)
            except Exception as e:  # a broken state is exactly what this script looks for
                row.update(servable=False, error=f"{type(e).__name__}: {e}")
            rows.append(row)
            s = row.get("state") or {}
            print(f"run {k}: {'killed' if killed else 'finished'} after {row['after_s']} s, servable "
                  f"{row['servable']}, round {s.get('round')}, frames {s.get('frames')}", flush=True)
        log = read_log(state / "metrics.jsonl")
        summary = summarize(log)
    kills = [r for r in rows if r["killed"]]
    payload = {"command": command_line(), "environment": environment(), "runs": rows, "summary": {
        k: summary[k] for k in ("frames", "starts", "resumes", "rounds", "passed", "rejected", "swaps", "rollbacks",
                                "served_only_passed", "violations", "stop_reason")},
        "log_truncated_lines": len(log.truncated_lines)}
    lines = ["# Device loop: fault injection (SIGKILL at random moments)", "", f"Command: `{payload['command']}`", "",
             f"{len(kills)} kills at uniform random times in [{args.min_wait}, {args.max_wait}] s after each start, "
             f"then one run to the end of the stream ({args.fps:g} frames/s while killing, {args.final_fps:g} in the "
             "last run).", "",
             "| run | killed after s | servable after | serving round | frames saved |", "|---:|---:|---|---:|---:|"]
    for r in rows:
        s = r.get("state") or {}
        lines.append(f"| {r['run']} | {r['after_s'] if r['killed'] else 'finished'} | {r['servable']} | "
                     f"{s.get('round', '-')} | {s.get('frames', '-')} |")
    sm = payload["summary"]
    lines += ["", f"States servable after a kill: {sum(r['servable'] for r in kills)} / {len(kills)}; restarts that "
              f"resumed: {sm['resumes']} (of {sm['starts']} starts); final run stop reason: {sm['stop_reason']}.",
              f"Rounds {sm['rounds']}, passed {sm['passed']}, rejected {sm['rejected']}, swaps {sm['swaps']}, "
              f"rollbacks {sm['rollbacks']}; truncated log lines skipped: {payload['log_truncated_lines']}.",
              f"**Served only candidates that passed their gates: {sm['served_only_passed']}** "
              f"({len(sm['violations'])} violations)."]
    publish(args.out or RESULTS / "loop_faults", payload, lines)
    if not (all(r["servable"] for r in kills) and sm["served_only_passed"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
