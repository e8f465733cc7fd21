"""The device loop on real photos (Fashion-MNIST t10k, `apt-get install dataset-fashion-mnist`), as a user
runs it: the committed Fashion model (scripts/train_fashion.py) GpreBN-adapted on 512 clean train images with
`gprebn-edge adapt`, then `gprebn-edge loop` on a stream of 4 x 1000 t10k photos: clean, gaussian_noise-5,
contrast-5, clean (an .npz with labels), paced at 50 frames/s. Baselines: the same stream served by the
unadapted model and by the clean-adapted start model (serve-only loops). Accuracy over each segment's second
half, from the loops' own metrics logs.

    OMP_NUM_THREADS=1 python benchmarks/fashion_loop.py      # ~2 minutes on 2 cores

Writes benchmarks/results/fashion_loop.{json,md}."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gprebn_edge.data.corruptions import corrupt  # noqa: E402
from gprebn_edge.data.idx import FASHION_MNIST_DIR, load_fashion_mnist, to_rgb32  # noqa: E402
from gprebn_edge.io import write_text_atomic  # noqa: E402

WEIGHTS = ROOT / "benchmarks" / "models" / "fashion_small_resnet.safetensors"
SEGMENTS = (("clean", None), ("gaussian_noise", 5), ("contrast", 5), ("clean", None))
FRAMES = 1000


def cli(*args: str) -> str:
    exe = Path(sys.executable).with_name("gprebn-edge")
    out = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if out.returncode != 0:
        raise SystemExit(f"gprebn-edge {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def second_halves(log: Path) -> list[float]:
    """Accuracy over the second half of each segment, from the window records (windows of 250 frames)."""
    totals = [[0, 0] for _ in SEGMENTS]
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "window" and (rec["frames"] - 1) % FRAMES >= FRAMES // 2:
            k = (rec["frames"] - 1) // FRAMES
            totals[k][0] += rec["correct"]
            totals[k][1] += rec["labeled"]
    return [c / n for c, n in totals]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fashion_loop")
    args = parser.parse_args()
    x, y = load_fashion_mnist("t10k", args.data)
    train, train_y = load_fashion_mnist("train", args.data)
    x = to_rgb32(x)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        np.savez(d / "calib.npz", images=to_rgb32(train[:512]), labels=train_y[:512])
        parts = [x[k * FRAMES:(k + 1) * FRAMES] if name == "clean" else
                 corrupt(x[k * FRAMES:(k + 1) * FRAMES], name, sev, seed=k) for k, (name, sev) in enumerate(SEGMENTS)]
        np.savez(d / "stream.npz", images=np.concatenate(parts), labels=y[:len(SEGMENTS) * FRAMES])
        cli("adapt", "--model", "builtin:small_resnet", "--weights", str(WEIGHTS), "--data", str(d / "calib.npz"),
            "-o", str(d / "start.safetensors"))
        cli("export", str(d / "start.safetensors"), "--onnx", str(d / "start.onnx"))
        cli("export", str(d / "start.safetensors"), "--onnx", str(d / "source.onnx"), "--unadapted")
        summary = cli("loop", "--model", str(d / "start.safetensors"), "--source", str(d / "stream.npz"), "--state",
                      str(d / "loop"), "--fps", "50").splitlines()[0]
        cli("loop", "--onnx", str(d / "source.onnx"), "--source", str(d / "stream.npz"), "--state", str(d / "src"))
        cli("loop", "--onnx", str(d / "start.onnx"), "--source", str(d / "stream.npz"), "--state", str(d / "start"))
        report = json.loads(cli("loop-report", str(d / "loop" / "metrics.jsonl"), "--json", "-"))
        rows = {"loop": second_halves(d / "loop" / "metrics.jsonl"),
                "unadapted": second_halves(d / "src" / "metrics.jsonl"),
                "clean-adapted start": second_halves(d / "start" / "metrics.jsonl")}
    names = [f"{n}-{s}" if s else n for n, s in SEGMENTS]
    lines = ["# The device loop on real photos (Fashion-MNIST)", "",
             "`OMP_NUM_THREADS=1 python benchmarks/fashion_loop.py`. " + __doc__.split("\n\n")[0].replace("\n", " "),
             "",
             f"Loop: {summary}. Rounds by trigger: {report['triggers']}; rejected {report['rejected']} "
             f"({report['rejection_reasons']}); p99 serving latency idle / adapting "
             f"{report['latency_ms']['idle']['p99']:.3f} / {report['latency_ms']['adapting']['p99']:.3f} ms.", "",
             "| model | " + " | ".join(f"{n}#{k}" for k, n in enumerate(names)) + " |",
             "|---|" + "---:|" * len(names)]
    lines += [f"| {m} | " + " | ".join(f"{100 * a:.1f}" for a in acc) + " |" for m, acc in rows.items()]
    print("\n".join(lines))
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(
        {"segments": names, "second_half_accuracy": rows, "loop": summary, "report": {
            k: report[k] for k in ("rounds", "triggers", "rejected", "rejection_reasons", "swaps", "errors")}},
        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
