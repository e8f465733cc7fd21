"""`gprebn-edge demo`: the whole chain on built-in data, on whatever machine it runs on.

For each of a few shifts (severity-5 corruptions and the style shift): adapt the built-in model with GpreBN
on an unlabeled calibration stream -> export the unadapted and the adapted model as folded ONNX (same graph,
parity-checked) -> compare the two ONNX files with onnxruntime on held-out images of the same shift
(error, agreement, calibration, interleaved latency). Then benchmark both ONNX files of the first shift at
batch 1 and 32. TensorRT steps (engine build, engine latency) run where TensorRT and a GPU exist and are
reported as skipped otherwise. Everything lands in one report folder: JSON, markdown and PNG plots."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file
from gprebn_edge.errors import GprebnError, InputError
from gprebn_edge.io import strict_json, write_text_atomic

__all__ = ["DEMO_DOMAINS", "run_demo"]

DEMO_DOMAINS = ("gaussian_noise", "shot_noise", "impulse_noise", "fog", "contrast", "style")
DemoProgress = Callable[[str, int, int], None]


def _spec(domain: str, split: str, n: int) -> str:
    sev = "" if domain in ("clean", "style") else ":5"
    return f"synthetic:{domain}{sev}:n={n}:split={split}"


def _tensorrt_status() -> str | None:
    """None where engines can be built here, else why not."""
    from gprebn_edge.optional import import_polygraphy, import_tensorrt

    try:
        import_tensorrt()
        import_polygraphy()  # engines are built and run through it
    except GprebnError as e:
        return str(e)
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU visible to torch"
    except ImportError:
        pass
    return None


def _domain(domain: str, folder: Path, n_calib: int, n_test: int, latency_iters: int,
            say: Callable[[str], None]) -> dict[str, Any]:
    from gprebn_edge.export.pipeline import export_artifact
    from gprebn_edge.runtime.compare import write_json
    from gprebn_edge.runtime.compare_plot import plot_compare
    from gprebn_edge.runtime.tasks import compare_models

    folder.mkdir(exist_ok=True)
    ckpt = folder / "adapted.safetensors"
    say("adapting with GpreBN")
    adapted = adapt_to_file("builtin:small_resnet", _spec(domain, "calib", n_calib), ckpt,
                            AdaptConfig(method="gprebn", batch_size=64))
    say("exporting adapted and unadapted ONNX")
    exports = {which: export_artifact(ckpt, folder / f"{which}.onnx", unadapted=which == "unadapted",
                                      check_images=min(n_calib, 500))
               for which in ("unadapted", "adapted")}
    say("comparing on held-out images")
    result = compare_models(folder / "unadapted.onnx", folder / "adapted.onnx", _spec(domain, "test", n_test),
                            latency_iters=latency_iters)
    write_json(result, folder / "compare.json")
    plot_compare(result, folder / "compare.png")
    write_text_atomic(folder / "compare.md", result.to_markdown())
    a, b = result.a, result.b
    assert a.error is not None and b.error is not None and result.latency is not None
    return {"domain": domain + ("" if domain in ("clean", "style") else "-5"), "folder": str(folder),
            "source_error": a.error, "adapted_error": b.error, "agreement": result.agreement,
            "source_ece": a.ece, "adapted_ece": b.ece, "online_error": adapted.summary["online_error"],
            "health": adapted.summary["health"]["verdict"],
            "latency_ratio": result.latency["ratio"], "latency_ratio_ci95": result.latency["ratio_ci95"],
            "parity_max_rel": max(e["parity"]["max_rel"] for e in exports.values()),
            "parity_top1": min(e["parity"]["top1_agreement"] for e in exports.values()),
            "parity_images": exports["adapted"]["parity"]["images"]}


def _bench(folder: Path, iters: int, say: Callable[[str], None]) -> dict[str, Any]:
    from gprebn_edge.runtime.latency_plot import plot_latency
    from gprebn_edge.runtime.tasks import RunnerOptions, bench_model

    say("benchmarking both ONNX files with onnxruntime")
    runs = {which: bench_model(folder / f"{which}.onnx", RunnerOptions(), batches=(1, 32), iters=iters)
            for which in ("unadapted", "adapted")}
    rows = []
    for i, batch in enumerate((1, 32)):
        u, a = runs["unadapted"][i], runs["adapted"][i]
        rows.append({"batch": batch, "unadapted_p50_ms": u.stats["p50"], "adapted_p50_ms": a.stats["p50"],
                     "unadapted_p99_ms": u.stats["p99"], "adapted_p99_ms": a.stats["p99"],
                     "ratio_p50": a.stats["p50"] / u.stats["p50"], "warnings": u.warnings + a.warnings})
    results = [r for which in ("unadapted", "adapted") for r in runs[which]]
    plot_latency(results, folder.parent / "latency.png",
                 labels=[f"{which} b{r.batch}" for which in ("unadapted", "adapted") for r in runs[which]],
                 title="onnxruntime latency, unadapted vs adapted (same graph)")
    write_text_atomic(folder.parent / "bench.json", strict_json(
        {which: [r.to_dict() for r in rs] for which, rs in runs.items()}, indent=1) + "\n")
    return {"model_folder": str(folder), "rows": rows, "plot": str(folder.parent / "latency.png"),
            "environment": results[0].environment}


def _errors_plot(rows: list[dict[str, Any]], path: Path) -> None:
    from gprebn_edge.optional import new_figure, save_figure

    fig = new_figure((1.3 * len(rows) + 2, 4.0))
    ax = fig.subplots()
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [100 * r["source_error"] for r in rows], 0.4, label="unadapted")
    ax.bar([x + 0.2 for x in xs], [100 * r["adapted_error"] for r in rows], 0.4, label="adapted (GpreBN)")
    ax.set_xticks(list(xs), [r["domain"] for r in rows], rotation=20)
    ax.set_ylabel("top-1 error on held-out images (%)")
    ax.set_title("ONNX (onnxruntime), unadapted vs adapted")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _output_folder(out: Path) -> Path:
    """`out`, created if needed and checked to be a writable folder before any work."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder: give a folder (it is created if needed)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise InputError(f"cannot write to --out {out}: {e.strerror or e}; give a writable folder") from None
    return out


def run_demo(out: str | Path, *, quick: bool = False, domains: tuple[str, ...] | None = None,
             progress: DemoProgress | None = None) -> dict[str, Any]:
    """Run the demo into `out` (created if needed): one sub-folder per shift with the checkpoint, both ONNX
    files, their manifests and the comparison; report.json, report.md, errors.png, latency.png and
    bench.json at the top. Returns the report."""
    from gprebn_edge.data.domains import DOMAINS

    domains = DEMO_DOMAINS if domains is None else domains
    unknown = [d for d in domains if d not in DOMAINS]
    if not domains or unknown:
        raise GprebnError(f"unknown shift(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(DOMAINS)}")
    out = _output_folder(Path(out))
    n_calib, n_test, latency_iters, bench_iters = (256, 256, 20, 20) if quick else (2000, 2000, 300, 200)
    start = time.perf_counter()
    steps = len(domains) + 1
    rows = []
    for i, domain in enumerate(domains):
        def say(what: str, i: int = i, domain: str = domain) -> None:
            if progress is not None:
                progress(f"{domain}: {what}", i, steps)

        rows.append(_domain(domain, out / domain, n_calib, n_test, latency_iters, say))
    if progress is not None:
        progress("benchmarking", len(domains), steps)
    bench = _bench(out / domains[0], bench_iters, lambda what: None)
    _errors_plot(rows, out / "errors.png")
    trt = _tensorrt_status()
    tensorrt = {"status": "skipped", "reason": trt} if trt else _tensorrt_steps(out / domains[0])
    if progress is not None:
        progress("done", steps, steps)
    report = {"model": "builtin:small_resnet", "method": "gprebn", "calibration_images": n_calib,
              "test_images": n_test, "rows": rows, "bench": bench, "tensorrt": tensorrt,
              "plots": [str(out / "errors.png"), str(out / "latency.png"),
                        *(str(Path(r["folder"]) / "compare.png") for r in rows)],
              "seconds": round(time.perf_counter() - start, 1), "report": str(out / "report.md")}
    write_text_atomic(out / "report.json", strict_json(report, indent=1) + "\n")  # NaN/inf: null
    write_text_atomic(out / "report.md", _markdown(report))
    return report


def _tensorrt_steps(folder: Path) -> dict[str, Any]:
    """Build fp32 engines of both exports and time them (only where TensorRT and a GPU exist)."""
    from gprebn_edge.export.pipeline import EngineOptions, export_artifact
    from gprebn_edge.runtime.tasks import RunnerOptions, bench_model

    out: dict[str, Any] = {"status": "ran", "engines": {}}
    for which in ("unadapted", "adapted"):
        manifest = export_artifact(folder / "adapted.safetensors", folder / f"{which}.onnx",
                                   unadapted=which == "unadapted", check_images=500,
                                   engine=EngineOptions(engine=folder / f"{which}.engine", refittable=True))
        result = bench_model(folder / f"{which}.engine", RunnerOptions(backend="tensorrt"), batches=(1,), iters=200)[0]
        out["engines"][which] = {"engine": manifest["tensorrt"]["engine"], "p50_ms": result.stats["p50"],
                                 "p99_ms": result.stats["p99"], "gpu": manifest["tensorrt"].get("gpu")}
    out["ratio_p50"] = out["engines"]["adapted"]["p50_ms"] / out["engines"]["unadapted"]["p50_ms"]
    return out


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# gprebn-edge demo", "",
             f"{report['model']} adapted with GpreBN on {report['calibration_images']} unlabeled calibration "
             f"images per shift, exported unadapted and adapted as folded ONNX (identical graphs), and compared "
             f"with onnxruntime on {report['test_images']} held-out images of the same shift.", "",
             "| shift | unadapted error | adapted error | agreement | ECE unadapted / adapted | latency adapted / "
             "unadapted (95 % CI) | ONNX parity (max rel, top-1) | health check |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        lo, hi = r["latency_ratio_ci95"]
        lines.append(f"| {r['domain']} | {100 * r['source_error']:.2f} % | {100 * r['adapted_error']:.2f} % | "
                     f"{100 * r['agreement']:.1f} % | {r['source_ece']:.3f} / {r['adapted_ece']:.3f} | "
                     f"{r['latency_ratio']:.3f} ({lo:.2f}-{hi:.2f}) | {r['parity_max_rel']:.1e}, "
                     f"{100 * r['parity_top1']:.0f} % | {r['health']} |")
    mean_s = sum(r["source_error"] for r in report["rows"]) / len(report["rows"])
    mean_a = sum(r["adapted_error"] for r in report["rows"]) / len(report["rows"])
    lines += [f"| mean | {100 * mean_s:.2f} % | {100 * mean_a:.2f} % | | | | | |", "",
              "onnxruntime CPU latency of the first shift's exports (`bench`, p50 / p99 ms):", "",
              "| batch | unadapted | adapted | adapted / unadapted (p50) |", "|---:|---:|---:|---:|"]
    for b in report["bench"]["rows"]:
        lines.append(f"| {b['batch']} | {b['unadapted_p50_ms']:.3f} / {b['unadapted_p99_ms']:.3f} | "
                     f"{b['adapted_p50_ms']:.3f} / {b['adapted_p99_ms']:.3f} | {b['ratio_p50']:.3f} |")
    t = report["tensorrt"]
    lines += ["", f"TensorRT: {t['status']}" + (f" ({t['reason']})" if t.get("reason") else
                                                 f", engine latency ratio adapted / unadapted {t['ratio_p50']:.3f}"),
              "", "Plots: " + ", ".join(report["plots"]), "", f"Total time {report['seconds']:.1f} s.", ""]
    return "\n".join(lines)
