"""The device loop's memory serving EfficientNet-Lite0 from a video while it re-adapts (issue 17, item 5).

Each run is a fresh `gprebn-edge loop` process serving the same video (the walk-through's site photos, cycled
in a different order each time, written as an MJPG .avi at 256x256) at --fps, with --buffer 512 and a round
every 500 frames (and on shifts). Configurations, interleaved over --repeat rounds:

- serve only: the start checkpoint's ONNX, no adaptation (what serving alone costs);
- adapting: --model, no budget;
- adapting under each --budget (--max-memory).

Per run: the process's peak RSS (os.wait4's ru_maxrss: the whole process, serving and rounds), the peak the
loop itself reports (its last metrics window), rounds and how they ended, seconds per round, the memory plan,
and serving latency p50/p99 over the run's windows. The start checkpoint is EfficientNet-Lite0 AdaBN-adapted
on the site images (statistics only: quick; the loop itself continues with GpreBN).

    python benchmarks/real_photos.py --write-site /tmp/site_images  # once; apt-get install python3-skimage opencv-doc
    python benchmarks/loop_memory.py --site /tmp/site_images --budgets 2GB 1.5GB --repeat 2   # ~25 min on 2 cores
Writes benchmarks/results/loop_memory.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, environment, publish, run_child  # noqa: E402

from gprebn_edge.progress import ProgressLine  # noqa: E402

MODEL = str(ROOT / "examples" / "efficientnet_lite0.py") + ":make_model"
BIN = Path(sys.executable).parent
SIDE = 256  # video frames (the model's preprocessing takes its 224 crop from them)


def write_video(site: Path, out: Path, cycles: int, seed: int = 0) -> int:
    """The site photos, each cycle in a new order, as an MJPG video; returns its frame count."""
    import cv2

    photos = sorted(p for p in site.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not photos:
        sys.exit(f"no photos in {site}")
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (SIDE, SIDE))
    rng = np.random.default_rng(seed)
    frames = 0
    try:
        for _ in range(cycles):
            for i in rng.permutation(len(photos)):
                image = cv2.imread(str(photos[i]), cv2.IMREAD_COLOR)
                writer.write(cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA))
                frames += 1
    finally:
        writer.release()
    return frames


def prepare(site: Path, tmp: Path) -> tuple[Path, Path]:
    """The start checkpoint (AdaBN on the site photos) and its ONNX file."""
    ckpt, onnx = tmp / "start.safetensors", tmp / "start.onnx"
    for cmd in ([str(BIN / "gprebn-edge"), "adapt", "--model", MODEL, "--data", str(site), "--method", "adabn",
                 "-o", str(ckpt), "--force"],
                [str(BIN / "gprebn-edge"), "export", str(ckpt), "--model", MODEL, "--onnx", str(onnx),
                 "--check-images", "64"]):
        wall, _, rc, tail = run_child(cmd)
        if rc != 0:
            sys.exit(f"{' '.join(cmd[1:3])} failed: {tail}")
        print(f"{cmd[1]}: {wall:.0f} s", file=sys.stderr, flush=True)
    return ckpt, onnx


def loop_cmd(cfg: dict[str, Any], video: Path, ckpt: Path, onnx: Path, state: Path, fps: float) -> list[str]:
    cmd = [str(BIN / "gprebn-edge"), "loop", "--source", f"video:{video}", "--state", str(state),
           "--buffer", "512", "--every", "500", "--fps", str(fps), "--trust-model-code"]
    cmd += ["--onnx", str(onnx)] if cfg["budget"] == "serve" else ["--model", str(ckpt)]
    return cmd + (["--max-memory", cfg["budget"]] if cfg["budget"] not in ("serve", "none") else [])


def measure(cfg: dict[str, Any], video: Path, ckpt: Path, onnx: Path, tmp: Path, fps: float) -> dict[str, Any]:
    state = tmp / f"state-{cfg['budget']}"
    if state.exists():
        import shutil

        shutil.rmtree(state)
    wall, rss, rc, tail = run_child(loop_cmd(cfg, video, ckpt, onnx, state, fps))
    records = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()] if rc == 0 else []
    windows = [r for r in records if r["event"] == "window"]
    rounds = [r for r in records if r["event"] == "round"]
    return {"rc": rc, "error": tail.strip().splitlines()[-1] if rc else None, "wall": wall, "rss": rss,
            "reported_peak_mb": windows[-1].get("peak_rss_mb") if windows else None,
            "frames": windows[-1]["frames"] if windows else 0,
            "rounds": len(rounds), "passed": sum(bool(r.get("passed")) for r in rounds),
            "round_errors": sum(r.get("outcome") == "error" for r in rounds),
            "round_seconds": [r.get("seconds") for r in rounds],
            "memory_plan": next((r["memory_plan"] for r in rounds if r.get("memory_plan")), None),
            "p50_ms": statistics.median(w["latency_ms"]["p50"] for w in windows) if windows else None,
            "p99_ms": max(w["latency_ms"]["p99"] for w in windows) if windows else None}


def summarize(cfg: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["rc"] == 0]
    rss = [r["rss"] / 1e9 for r in ok]
    mean = statistics.fmean(rss) if rss else None
    cv = statistics.pstdev(rss) / mean if len(rss) > 1 and mean else None
    return {**cfg, "runs": runs, "peak_rss_gb": mean, "peak_rss_gb_max": max(rss) if rss else None,
            "peak_rss_cv": cv, "failed": len(runs) - len(ok)}


def markdown(payload: dict[str, Any]) -> list[str]:
    a = payload["args"]
    lines = ["# The device loop's peak memory serving EfficientNet-Lite0 while it adapts (issue 17)", "",
             f"Command: `{payload['command']}`", "",
             f"Each run: a fresh `gprebn-edge loop --source video:... --buffer 512 --every 500 --fps {a['fps']}` "
             f"process serving {payload['frames']} frames (the {payload['photos']} site photos of `{a['site']}`, "
             f"{a['cycles']} cycles in new orders, MJPG {SIDE}x{SIDE}), 1 onnxruntime serving thread, 1 torch "
             "adaptation thread; configurations interleaved, each run "
             f"{a['repeat']} time(s). Peak RSS: the process's ru_maxrss (os.wait4); 'loop says': the peak in its "
             "last metrics window. Latency: median of the windows' p50, largest window p99.", "",
             "| run | --max-memory | peak RSS (GB) | max of runs | CV | loop says (GB) | rounds (passed, errors) | "
             "s per round | serving p50 / p99 (ms) | memory plan |",
             "|---|---|---:|---:|---:|---:|---|---:|---|---|"]
    for row in payload["rows"]:
        ok = [r for r in row["runs"] if r["rc"] == 0]
        if not ok:
            lines.append(f"| {row['run']} | {row['budget']} | FAILED: {row['runs'][0]['error']} |  |  |  |  |  |  |  |")
            continue
        secs = [s for r in ok for s in r["round_seconds"] if s is not None]
        said = [r["reported_peak_mb"] / 1e3 for r in ok if r["reported_peak_mb"] is not None]
        cells = [row["run"], row["budget"] if row["budget"] not in ("serve", "none") else "-",
                 f"{row['peak_rss_gb']:.2f}", f"{row['peak_rss_gb_max']:.2f}",
                 "" if row["peak_rss_cv"] is None else f"{100 * row['peak_rss_cv']:.1f} %",
                 f"{max(said):.2f}" if said else "-",
                 f"{'/'.join(str(r['rounds']) for r in ok)} ({'/'.join(str(r['passed']) for r in ok)}, "
                 f"{sum(r['round_errors'] for r in ok)})",
                 f"{statistics.fmean(secs):.1f}" if secs else "-",
                 f"{statistics.median(r['p50_ms'] for r in ok):.1f} / {max(r['p99_ms'] for r in ok):.1f}",
                 ok[0]["memory_plan"] or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=Path("/tmp/site_images"))
    parser.add_argument("--budgets", nargs="*", default=["2GB"], help="--max-memory values to run under")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=3, help="times the photos are cycled in the video")
    parser.add_argument("--fps", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "loop_memory")
    args = parser.parse_args()
    if not args.site.is_dir():
        sys.exit(f"{args.site} not found: make it with `python benchmarks/real_photos.py --write-site {args.site}` "
                 "(needs apt-get install python3-skimage opencv-doc)")
    cfgs = [{"run": "serve only", "budget": "serve"}, {"run": "adapting", "budget": "none"}]
    cfgs += [{"run": "adapting", "budget": b} for b in args.budgets]
    results: list[list[dict[str, Any]]] = [[] for _ in cfgs]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        video = tmp / "site.avi"
        frames = write_video(args.site, video, args.cycles)
        ckpt, onnx = prepare(args.site, tmp)
        progress = ProgressLine("loop_memory", len(cfgs) * args.repeat, unit="runs", every=30.0)
        done = 0
        for _ in range(args.repeat):
            for i, cfg in enumerate(cfgs):
                r = measure(cfg, video, ckpt, onnx, tmp, args.fps)
                results[i].append(r)
                done += 1
                progress.update(done)
                print(f"{cfg['run']} {cfg['budget']}: {r['wall']:.0f} s, {r['rss'] / 1e9:.2f} GB, rounds "
                      f"{r['rounds']}{' FAILED ' + str(r['error']) if r['rc'] else ''}", file=sys.stderr, flush=True)
        progress.close()
    args_d = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"command": command_line(), "environment": environment(), "args": args_d, "frames": frames,
               "photos": frames // args.cycles,
               "rows": [summarize(c, rs) for c, rs in zip(cfgs, results, strict=True)]}
    publish(args.out, payload, markdown(payload))


if __name__ == "__main__":
    main()
