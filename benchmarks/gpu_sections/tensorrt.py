"""Section `tensorrt`: the engine path as a user takes it, through the library. Per precision (fp32, fp16,
int8 Q/DQ), the unadapted and adapted built-in models are exported to ONNX (`export_model(precision=...)`),
a refittable engine of the unadapted file is built strongly typed (`build_engine`, Polygraphy), refitted
from the adapted file (`refit_engine_file`, OnnxParserRefitter), checked against onnxruntime on the CPU
running the adapted file, and timed (`benchmark` on `TensorRTRunner`). Then onnxruntime's GPU providers,
where onnxruntime-gpu is installed. Without TensorRT and Polygraphy: "not available", not a failure."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gpu_sections.harness import Check, NotAvailable
from gpu_sections.parity import compare

# the engine (or provider) against onnxruntime CPU on the same file: (max relative error, top-1 agreement)
LIMITS = {"fp32": (5e-3, 0.97), "fp16": (5e-2, 0.97), "int8": (0.35, 0.85)}


def run(c: Check) -> None:
    from gprebn_edge.errors import MissingDependencyError
    from gprebn_edge.optional import import_polygraphy, import_tensorrt

    try:
        trt = import_tensorrt()
        import_polygraphy()
    except MissingDependencyError as e:
        c.note("onnxruntime GPU providers: not tried without TensorRT's libraries")
        raise NotAvailable(str(e)) from None
    if not c.cuda:
        raise NotAvailable("TensorRT needs --device cuda")
    c.note(f"TensorRT {trt.__version__}")
    files, images = _exports(c)
    for precision, (unadapted, adapted) in files.items():
        if not c.enough(10, f"{precision} engine"):
            break
        with c.attempt(f"{precision} engine"):
            _engine(c, precision, unadapted, adapted, images)
    _ort_gpu(c, files, images)


def _exports(c: Check) -> tuple[dict[str, tuple[Path, Path]], Any]:
    """(unadapted, adapted) ONNX files of the built-in model per precision, made and checked by the export,
    and 32 of the images to compare engines on."""
    from gprebn_edge.export.pipeline import export_model

    case = c.models(["builtin"])[0]
    adapted = c.adapted.get("builtin")
    if adapted is None:
        raise NotAvailable("the adapt section made no adapted model")
    images, _ = c.images(case, 128)  # int8 calibrates on them: at least 64
    meta = {"preprocess": case.preprocess.to_dict(), "num_classes": 10}
    files = {}
    for precision in LIMITS:
        paths = tuple(c.tmp / f"trt-{which}-{precision}.onnx" for which in ("unadapted", "adapted"))
        for model, path, which in ((case.model, paths[0], "source"), (adapted, paths[1], "adapted")):
            export_model(model, meta, path, [images], which=which, precision=precision)
        files[precision] = paths
    return files, images[:32]


def _engine(c: Check, precision: str, unadapted: Path, adapted: Path, images: Any) -> None:
    from gprebn_edge.export.tensorrt_build import build_engine, refit_engine_file
    from gprebn_edge.runtime.bench import benchmark
    from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner
    from gprebn_edge.runtime.trt_runner import TensorRTRunner

    t0 = time.perf_counter()
    path = c.tmp / f"unadapted-{precision}.engine"
    info = build_engine(unadapted, path, batch=(1, 1, 32), refittable=True, timing_cache=c.tmp / "timing.cache")
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = refit_engine_file(path, adapted, c.tmp / f"adapted-{precision}.engine")
    refit = time.perf_counter() - t0
    with OnnxRuntimeRunner(adapted) as ort:
        ref = ort.infer(images)
    with TensorRTRunner(engine) as r:
        m = compare(r.infer(images), ref)
        c.row(engine=precision, step="build + refit to adapted", build_s=built, refit_s=refit,
              engine_precision=info["precision"], top1_agreement=m["agreement"], max_rel_error=m["max_rel"])
        limit, agree = LIMITS[precision]
        if m["max_rel"] > limit or m["agreement"] < agree:
            c.fail(f"refitted {precision} engine vs onnxruntime: agreement {m['agreement']:.3f}, max rel "
                   f"{m['max_rel']:.2e}")
        for b in (1, 32):
            res = benchmark(r, batch=b, warmup=3, warmup_seconds=0.2, duration=0.6, environment=False)
            c.row(engine=precision, step="latency", batch=b, p50_ms=res.stats["p50"], images_per_s=res.throughput,
                  cv=res.cv)


def _ort_gpu(c: Check, files: dict[str, tuple[Path, Path]], images: Any) -> None:
    """onnxruntime's CUDA and TensorRT providers on the adapted files (the second GPU route)."""
    import onnxruntime

    from gprebn_edge.errors import MissingDependencyError
    from gprebn_edge.runtime.bench import benchmark
    from gprebn_edge.runtime.ort_runner import PROVIDERS, OnnxRuntimeRunner

    available = onnxruntime.get_available_providers()
    routes = [p for p in (("tensorrt", "cuda"), ("cuda",)) if PROVIDERS[p[0]] in available]
    if not routes:
        c.note(f"onnxruntime GPU providers: not available (this onnxruntime has {', '.join(available)})")
        return
    for precision, (_, adapted) in files.items():
        with OnnxRuntimeRunner(adapted) as cpu:
            ref = cpu.infer(images)
        for providers in routes:
            if not c.enough(8, f"onnxruntime {'+'.join(providers)} {precision}"):
                return
            with c.attempt(f"onnxruntime {'+'.join(providers)} {precision}"):
                try:
                    runner: Any = OnnxRuntimeRunner(adapted, providers=providers, engine_cache=c.tmp / "ort-trt")
                    runner.activate()
                except MissingDependencyError as e:
                    c.note(str(e))
                    continue
                try:
                    m = compare(runner.infer(images), ref)
                    res = benchmark(runner, batch=32, warmup=3, warmup_seconds=0.2, duration=0.6, environment=False)
                finally:
                    runner.deactivate()
                c.row(engine=precision, step=f"onnxruntime {'+'.join(providers)}", batch=32,
                      top1_agreement=m["agreement"], max_rel_error=m["max_rel"], p50_ms=res.stats["p50"])
