"""The device loop on the built-in shifting stream (clean -> fog -> gaussian noise -> contrast -> shot noise
-> clean, 1000 frames each, labels used only for scoring), against two static baselines served by the same
loop without adaptation:

- static unadapted: the source model (the `--unadapted` export of the starting checkpoint);
- static once-adapted: the starting checkpoint itself, GpreBN-adapted once, offline, on 2000 foggy
  calibration images (what `gprebn-edge adapt` gives a user who calibrated on the site's first conditions);
- loop: serves the once-adapted model and keeps re-adapting it from there.

Per segment: online accuracy of the three. For the loop: rounds, rejected candidates, swaps, rollbacks, and
the serving latency p50/p99 of frames served while a round ran in the background vs while none did.

    python benchmarks/loop.py            # ~4 minutes on 2 cores (the loop run is paced at 30 frames/s)
Writes benchmarks/results/loop.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, environment, publish  # noqa: E402

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file  # noqa: E402
from gprebn_edge.device.loop import LoopConfig, run_loop  # noqa: E402
from gprebn_edge.device.report import read_log, summarize  # noqa: E402
from gprebn_edge.export.pipeline import export_artifact  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream", default="stream")
    ap.add_argument("--fps", type=float, default=30.0, help="frame rate the loop run is served at (a camera's)")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--buffer", type=int, default=256)
    ap.add_argument("--out", type=Path, default=RESULTS / "loop")
    args = ap.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = folder / "start.safetensors"
        adapt_to_file("builtin:small_resnet", "synthetic:fog:5:n=2000:split=calib", start, AdaptConfig())
        unadapted = Path(export_artifact(start, folder / "unadapted.onnx", unadapted=True)["onnx"])
        adapted = Path(export_artifact(start, folder / "adapted.onnx")["onnx"])
        configs = {
            # a static model's accuracy does not depend on the frame rate: served unpaced
            "static unadapted": LoopConfig(state=folder / "s0", source=args.stream, onnx=unadapted),
            "static once-adapted": LoopConfig(state=folder / "s1", source=args.stream, onnx=adapted),
            "loop (re-adapting)": LoopConfig(state=folder / "s2", source=args.stream, model=start, onnx=adapted,
                                             fps=args.fps, every=args.every, buffer=args.buffer),
        }
        for name, config in configs.items():
            result = run_loop(config)
            runs[name] = summarize(read_log(result.log))
            print(f"{name}: accuracy {100 * runs[name]['accuracy']:.2f} %, swaps {runs[name]['swaps']}", flush=True)
    payload = {"command": command_line(), "environment": environment(), "fps": args.fps, "every": args.every,
               "buffer": args.buffer, "runs": runs}
    names = list(runs)
    segments = [s["name"] for s in runs[names[0]]["segments"]]
    lines = ["# Device loop on the built-in shifting stream", "", f"Command: `{payload['command']}`", "",
             f"Stream `{args.stream}` served one frame at a time (onnxruntime CPU, 1 thread), the loop run paced "
             f"at {args.fps:g} frames/s like a camera (the static runs unpaced: their accuracy does not depend on "
             f"it); the loop adapts every {args.every} frames on a sliding buffer of {args.buffer} frames "
             "(1 torch thread). Online accuracy (%):", "",
             "| segment | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for seg in [*segments, "all"]:
        cells = []
        for n in names:
            if seg == "all":
                acc = runs[n]["accuracy"]
            else:
                acc = next(s["accuracy"] for s in runs[n]["segments"] if s["name"] == seg)
            cells.append(f"{100 * acc:.2f}")
        lines.append(f"| {seg} | " + " | ".join(cells) + " |")
    loop = runs[names[-1]]
    lat = loop["latency_ms"]
    lines += ["", f"Loop: {loop['rounds']} adaptation rounds, {loop['passed']} passed their gates, {loop['rejected']} "
              f"rejected ({loop['errors']} worker errors), {loop['swaps']} swaps, {loop['rollbacks']} rollbacks; "
              f"served only candidates that passed: {loop['served_only_passed']}.", "",
              "Serving latency of the loop run (ms per frame, batch 1):", "",
              "| adaptation in background | frames | p50 | p99 |", "|---|---:|---:|---:|"]
    for key, label in (("idle", "none running"), ("adapting", "a round running")):
        v = lat[key] or {}
        p50, p99 = v.get("p50", float("nan")), v.get("p99", float("nan"))
        lines.append(f"| {label} | {v.get('n', 0)} | {p50:.3f} | {p99:.3f} |")
    ratio = lat.get("ratio") or {}
    lines.append(f"| ratio running / none | | {ratio.get('p50') or float('nan'):.2f}x | "
                 f"{ratio.get('p99') or float('nan'):.2f}x |")
    publish(args.out, payload, lines)


if __name__ == "__main__":
    main()
