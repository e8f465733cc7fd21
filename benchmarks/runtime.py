"""The runtime stage's figures, through the same library calls as `gprebn-edge bench` and `compare`.

1. bench: the built-in model's adapted ONNX with onnxruntime on CPU at batch 1 and 32, loaded twice (two
   independent sessions) and timed side by side in interleaved rounds (bench.time_interleaved: the two
   calls of a round back to back, ABBA order), so both loads see the same machine: each load's p50, p99,
   throughput and CV, and the paired ratio load 2 / load 1 (1.00 within noise) with its 95 % interval.
2. compare: the unadapted vs the adapted ONNX on held-out images of three corruptions: error, agreement,
   calibration, each model's latency and CV, and the paired latency ratio with its 95 % bootstrap interval
   beside the ratio of the p50s (the graphs are identical, so both should be 1.00 within noise).

Every CV (std / mean of the per-call times) above 10 % is flagged in the output and the JSON ("cv_ok"): the
README asks for such a result to be rerun before it is committed. One onnxruntime thread by default: on a
small shared machine, a second thread mostly waits for the other load and spreads the times.

    OMP_NUM_THREADS=1 python benchmarks/runtime.py     # ~2 minutes on 2 cores
Writes benchmarks/results/runtime.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, environment, publish  # noqa: E402

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file  # noqa: E402
from gprebn_edge.export.pipeline import export_artifact  # noqa: E402
from gprebn_edge.runtime.bench import CV_LIMIT, time_interleaved  # noqa: E402
from gprebn_edge.runtime.metrics import latency_summary, paired_ratio  # noqa: E402
from gprebn_edge.runtime.tables import fmt_pct, fmt_ratio, md_table  # noqa: E402
from gprebn_edge.runtime.tasks import RunnerOptions, compare_models  # noqa: E402

CORRUPTIONS = ("gaussian_noise", "fog", "contrast")


def export_pair(domain: str, folder: Path, n_calib: int) -> tuple[Path, Path]:
    artifact = folder / f"{domain}.safetensors"
    adapt_to_file("builtin:small_resnet", f"synthetic:{domain}:5:n={n_calib}:split=calib", artifact,
                  AdaptConfig(method="gprebn", batch_size=64))
    paths = folder / f"{domain}-unadapted.onnx", folder / f"{domain}-adapted.onnx"
    export_artifact(artifact, paths[0], unadapted=True, check_images=500)
    export_artifact(artifact, paths[1], check_images=500)
    return paths


def _cv(summary: dict[str, float]) -> float:
    return summary["std"] / summary["mean"]


def bench_pair(model: Path, options: RunnerOptions, batch: int, rounds: int, warmup_s: float) -> dict[str, Any]:
    """Two independent loads of `model`, warmed up for `warmup_s` seconds together, then `rounds` interleaved
    rounds on one seeded random batch."""
    with contextlib.ExitStack() as stack:
        runners = [stack.enter_context(options.open(model)) for _ in range(2)]
        dims = runners[0].inputs()[0].shape[1:]
        x = np.random.default_rng(0).standard_normal((batch, *dims), dtype=np.float32)
        start, warm = time.perf_counter(), 0
        while time.perf_counter() - start < warmup_s:
            runners[warm % 2].infer(x)
            warm += 1
        times = time_interleaved(runners, x, rounds)
    loads = [latency_summary(t, (50, 99)) for t in times]
    cvs = [_cv(s) for s in loads]
    return {"batch": batch, "rounds": rounds, "warmup_calls": warm, "loads": loads, "cv": cvs,
            "throughput": [batch / (s["mean"] / 1e3) for s in loads], **paired_ratio(times[0], times[1]),
            "cv_over_limit": [cv > CV_LIMIT for cv in cvs], "latencies_ms": times.round(5).tolist()}


def compare_row(domain: str, pair: tuple[Path, Path], options: RunnerOptions, n_test: int,
                rounds: int) -> dict[str, Any]:
    result = compare_models(pair[0], pair[1], f"synthetic:{domain}:5:n={n_test}:split=test",
                            options_a=options, options_b=options, latency_iters=rounds)
    assert result.latency is not None
    cvs = [_cv(m.latency_ms) for m in result.models if m.latency_ms is not None]
    return {"domain": f"{domain}-5", **result.to_dict(), "cv": cvs, "cv_over_limit": [cv > CV_LIMIT for cv in cvs]}


def markdown(args: argparse.Namespace, payload: dict[str, Any]) -> list[str]:
    bench_rows, compare_rows = payload["bench"], payload["compare"]
    lines = ["# Runtime stage on CPU (onnxruntime)", "", f"Command: `{payload['command']}`", ""]
    if not payload["cv_ok"]:
        lines += [f"**CV above {100 * CV_LIMIT:.0f} % in: {', '.join(payload['cv_over_limit'])}. The machine was "
                  "busy: rerun before trusting these numbers (README).**", ""]
    lines += [f"## bench: built-in model, adapted ONNX ({CORRUPTIONS[0]}), two independent loads timed side by side "
              f"in {args.rounds} interleaved rounds ({args.warmup:g} s warm-up, {args.threads} thread(s))", ""]
    lines += md_table(["batch", "p50 ms load 1 / 2", "p99 ms load 1 / 2", "throughput img/s", "CV load 1 / 2",
                       "paired ratio 2 / 1 (95 % CI)", "ratio of p50s"],
                      [[r["batch"], " / ".join(f"{s['p50']:.3f}" for s in r["loads"]),
                        " / ".join(f"{s['p99']:.3f}" for s in r["loads"]),
                        " / ".join(f"{t:,.0f}" for t in r["throughput"]),
                        " / ".join(fmt_pct(cv, 1) for cv in r["cv"]), _ratio_cell(r),
                        fmt_ratio(r["ratio_of_medians"])] for r in bench_rows])
    lines += ["", f"## compare: unadapted vs adapted ONNX, {args.n_test} held-out images per corruption, latency "
              f"at batch 1 over {args.rounds} interleaved rounds", ""]
    rows = []
    for r in compare_rows:
        a, b = r["models"]
        rows.append([r["domain"], fmt_pct(a["error"]), fmt_pct(b["error"]), fmt_pct(r["agreement"], 1),
                     f"{a['ece']:.3f} / {b['ece']:.3f}", f"{a['latency_ms']['p50']:.3f} / {b['latency_ms']['p50']:.3f}",
                     " / ".join(fmt_pct(cv, 1) for cv in r["cv"]), _ratio_cell(r["latency"]),
                     fmt_ratio(r["latency"]["ratio_of_medians"])])
    lines += md_table(["corruption", "error unadapted", "error adapted", "agreement", "ECE unadapted / adapted",
                       "p50 ms unadapted / adapted", "CV unadapted / adapted", "paired ratio (95 % CI)",
                       "ratio of p50s"], rows)
    lines += ["", "The paired ratio is the median over rounds of the two calls' ratio (drift cancels); the ratio of "
              "p50s divides the two p50s of the same rounds, and is marked * where it lies outside the paired "
              "interval (most often because the p50s fall in different latency modes; trust the paired ratio)."]
    return lines


def _ratio_cell(r: dict[str, Any]) -> str:
    lo, hi = r["ratio_ci95"]
    return f"{r['ratio']:.3f} ({lo:.3f}-{hi:.3f})" + ("" if r["ratio_of_medians_in_ci"] else " *")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-calib", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=500, help="interleaved rounds, bench and compare")
    ap.add_argument("--warmup", type=float, default=2.0, help="bench warm-up in seconds")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "runtime")
    args = ap.parse_args()
    options = RunnerOptions(threads=args.threads, shared_cpu=True)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = {d: export_pair(d, Path(tmp), args.n_calib) for d in CORRUPTIONS}
        bench_rows = []
        for batch in (1, 32):
            bench_rows.append(bench_pair(pairs[CORRUPTIONS[0]][1], options, batch, args.rounds, args.warmup))
            r = bench_rows[-1]
            print(f"bench batch {batch}: p50 {r['loads'][0]['p50']:.3f} / {r['loads'][1]['p50']:.3f} ms, CV "
                  f"{100 * r['cv'][0]:.1f} / {100 * r['cv'][1]:.1f} %, paired ratio {r['ratio']:.3f}", flush=True)
        compare_rows = []
        for domain, pair in pairs.items():
            compare_rows.append(compare_row(domain, pair, options, args.n_test, args.rounds))
            r = compare_rows[-1]
            print(f"compare {domain}: paired ratio {r['latency']['ratio']:.3f}, ratio of p50s "
                  f"{r['latency']['ratio_of_medians']:.3f}, CV {100 * r['cv'][0]:.1f} / {100 * r['cv'][1]:.1f} %",
                  flush=True)
    over = [f"bench batch {r['batch']}" for r in bench_rows if any(r["cv_over_limit"])]
    over += [f"compare {r['domain']}" for r in compare_rows if any(r["cv_over_limit"])]
    payload = {"command": command_line(), "environment": environment(), "cv_limit": CV_LIMIT, "cv_ok": not over,
               "cv_over_limit": over, "bench": bench_rows, "compare": compare_rows}
    publish(args.out, payload, markdown(args, payload))
    if over:
        print(f"WARNING: CV above {100 * CV_LIMIT:.0f} % in {', '.join(over)}: rerun before committing",
              file=sys.stderr)


if __name__ == "__main__":
    main()
