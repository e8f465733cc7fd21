"""The runtime stage's figures, through the same library calls as `gprebn-edge bench` and `compare`.

1. `bench` of the built-in model's adapted ONNX with onnxruntime on CPU at batch 1 and 32, run twice
   (two independent loads); the spread of p50 between the runs.
2. `compare` of the unadapted vs the adapted ONNX on held-out images of three corruptions: error, agreement,
   calibration, and the interleaved latency ratio with its 95 % bootstrap interval (the graphs are identical,
   so the ratio should be 1.00 within noise).

    python benchmarks/runtime.py               # ~2 minutes on 2 cores
Writes benchmarks/results/runtime.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, environment, publish  # noqa: E402

from gprebn_edge.adapt import AdaptConfig, adapt_to_file  # noqa: E402
from gprebn_edge.export.pipeline import export_artifact  # noqa: E402
from gprebn_edge.runtime.tasks import RunnerOptions, bench_model, compare_models  # noqa: E402

CORRUPTIONS = ("gaussian_noise", "fog", "contrast")


def export_pair(domain: str, folder: Path, n_calib: int) -> tuple[Path, Path]:
    artifact = folder / f"{domain}.safetensors"
    adapt_to_file("builtin:small_resnet", f"synthetic:{domain}:5:n={n_calib}:split=calib", artifact,
                  AdaptConfig(method="gprebn", batch_size=64))
    paths = folder / f"{domain}-unadapted.onnx", folder / f"{domain}-adapted.onnx"
    export_artifact(artifact, paths[0], unadapted=True, check_images=500)
    export_artifact(artifact, paths[1], check_images=500)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-calib", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--iters", type=int, default=500, help="bench iterations per run")
    ap.add_argument("--latency-iters", type=int, default=500, help="interleaved compare rounds")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: onnxruntime's)")
    ap.add_argument("--out", type=Path, default=RESULTS / "runtime")
    args = ap.parse_args()
    options = RunnerOptions(threads=args.threads)
    bench_rows, compare_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = {d: export_pair(d, Path(tmp), args.n_calib) for d in CORRUPTIONS}
        adapted = pairs[CORRUPTIONS[0]][1]
        for batch in (1, 32):
            runs = [bench_model(adapted, options, batches=(batch,), iters=args.iters, warmup="2s")[0] for _ in range(2)]
            p50 = [r.stats["p50"] for r in runs]
            bench_rows.append({"batch": batch, "runs": [r.to_dict() for r in runs],
                               "p50_ms": p50, "p99_ms": [r.stats["p99"] for r in runs],
                               "throughput": [r.throughput for r in runs], "cv": [r.cv for r in runs],
                               "p50_spread": abs(p50[1] - p50[0]) / min(p50)})
            print(f"bench batch {batch}: p50 {p50[0]:.3f} / {p50[1]:.3f} ms", flush=True)
        for domain, (source, target) in pairs.items():
            result = compare_models(source, target, f"synthetic:{domain}:5:n={args.n_test}:split=test",
                                    options_a=options, options_b=options, latency_iters=args.latency_iters)
            compare_rows.append({"domain": f"{domain}-5", **result.to_dict()})
            print(f"compare {domain}: ratio {result.latency['ratio']:.3f}", flush=True)
    payload = {"command": command_line(), "environment": environment(), "bench": bench_rows,
               "compare": compare_rows}
    lines = ["# Runtime stage on CPU (onnxruntime)", "", f"Command: `{payload['command']}`", "",
             f"## bench: built-in model, adapted ONNX ({CORRUPTIONS[0]}), two independent runs of {args.iters} "
             "iterations each (2 s warm-up)", "",
             "| batch | p50 ms run 1 / run 2 | p50 spread | p99 ms run 1 / run 2 | throughput img/s | CV |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in bench_rows:
        lines.append(f"| {r['batch']} | {r['p50_ms'][0]:.3f} / {r['p50_ms'][1]:.3f} | {100 * r['p50_spread']:.1f} % | "
                     f"{r['p99_ms'][0]:.3f} / {r['p99_ms'][1]:.3f} | {r['throughput'][0]:,.0f} / "
                     f"{r['throughput'][1]:,.0f} | {100 * r['cv'][0]:.0f} % / {100 * r['cv'][1]:.0f} % |")
    lines += ["", f"## compare: unadapted vs adapted ONNX, {args.n_test} held-out images per corruption, latency "
              f"at batch 1 over {args.latency_iters} interleaved rounds", "",
              "| corruption | error unadapted | error adapted | agreement | ECE unadapted / adapted | "
              "p50 ms unadapted / adapted | latency ratio (95 % CI) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in compare_rows:
        a, b = r["models"]
        lo, hi = r["latency"]["ratio_ci95"]
        lines.append(f"| {r['domain']} | {100 * a['error']:.2f} % | {100 * b['error']:.2f} % | "
                     f"{100 * r['agreement']:.1f} % | {a['ece']:.3f} / {b['ece']:.3f} | "
                     f"{a['latency_ms']['p50']:.3f} / {b['latency_ms']['p50']:.3f} | "
                     f"{r['latency']['ratio']:.3f} ({lo:.3f}-{hi:.3f}) |")
    publish(args.out, payload, lines)


if __name__ == "__main__":
    main()
