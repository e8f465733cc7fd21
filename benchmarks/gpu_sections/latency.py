"""Section `latency`: bench per mode (eager / CUDA graphs, fp32 / fp16, folded / unfolded), then the
adapted/unadapted latency ratio from `compare`'s interleaved rounds."""

from __future__ import annotations

import math
from typing import Any

from gpu_sections.adapt import adapt_on
from gpu_sections.harness import Case, Check

LATENCY_MODES = [("eager fp32 unfolded", {"folded": False}), ("eager fp32", {}),
                 ("CUDA graphs fp32", {"cuda_graphs": True}), ("eager fp16", {"fp16": True}),
                 ("CUDA graphs fp16", {"fp16": True, "cuda_graphs": True})]


def run(c: Check) -> None:
    """bench at batch 1 and 32 (the dry run: 1 and 4) per mode, then the unadapted/adapted latency ratio
    from `compare`'s interleaved rounds (identical folded graphs: it should be 1.00 within noise)."""
    modes = [m for m in LATENCY_MODES if c.cuda or ("graphs" not in m[0] and "fp16" not in m[0])]
    if not c.cuda:
        c.note("CUDA graphs and fp16 latency: not available on the CPU")
    cases = c.models(["builtin"] if c.quick else ["builtin", "resnet50", "mobilenet_v2"])
    for case in cases:
        for mode, options in modes:
            if not c.enough(4 if c.quick else 6, f"{case.name} {mode}"):
                break
            with c.attempt(f"{case.name} {mode}"):
                _latency(c, case, mode, options)
    for case in cases:
        if not c.enough(10 if c.quick else 25, f"{case.name} adapted/unadapted ratio"):
            break
        with c.attempt(f"{case.name} adapted/unadapted ratio"):
            _latency_ratio(c, case)


def _batches(c: Check) -> tuple[int, int]:
    return (1, 4) if c.quick else (1, 32)


def _latency(c: Check, case: Case, mode: str, options: dict[str, Any]) -> None:
    from gprebn_edge.export.fold import fold_batchnorm
    from gprebn_edge.runtime.bench import benchmark
    from gprebn_edge.runtime.torch_runner import TorchRunner

    duration, warm = (0.2, 0.1) if c.quick else (0.6, 0.2)
    shape = (3, case.size, case.size)
    if options.get("folded", True):  # the unfolded mode takes no fold
        options = {"prepare": fold_batchnorm, **options}
    with TorchRunner(case.model, device=c.device, input_shape=shape, **options) as r:  # folds once, both batches
        for b in _batches(c):
            res = benchmark(r, batch=b, warmup=3, warmup_seconds=warm, duration=duration, input_shape=shape,
                            environment=False)
            s = res.stats
            c.row(model=case.name, mode=mode, batch=b, p50_ms=s["p50"], p90_ms=s["p90"], mean_ms=s["mean"],
                  images_per_s=res.throughput, cv=res.cv, iterations=res.iterations, first_call_ms=res.first_call_ms)
            c.say(f"  {case.name} {mode} batch {b}: p50 {s['p50']:.3f} ms")
            if not (s["p50"] > 0 and math.isfinite(s["p50"])):
                c.fail(f"{case.name} {mode} batch {b}: p50 {s['p50']}")


def _latency_ratio(c: Check, case: Case) -> None:
    from gprebn_edge.adaptation import AdaptConfig
    from gprebn_edge.export.fold import fold_batchnorm
    from gprebn_edge.runtime.compare import compare
    from gprebn_edge.runtime.torch_runner import TorchRunner

    adapted = c.adapted.get(case.name)
    if adapted is None:
        adapted, _ = adapt_on(c.device, case.model, c.source(case, 128, "calib"), AdaptConfig(batch_size=64))
    source = c.source(case, 64, "test")
    rounds = 20 if c.quick else 150
    shape = (3, case.size, case.size)
    for b in _batches(c):
        a = TorchRunner(case.model, device=c.device, input_shape=shape, cuda_graphs=c.cuda, prepare=fold_batchnorm)
        d = TorchRunner(adapted, device=c.device, input_shape=shape, cuda_graphs=c.cuda, prepare=fold_batchnorm)
        res = compare(a, d, source, batch=32, latency_iters=rounds, latency_batch=b, names=("unadapted", "adapted"))
        lat = res.latency or {}
        lo, hi = lat.get("ratio_ci95", (math.nan, math.nan))
        c.row(model=case.name, mode=f"adapted / unadapted ({'CUDA graphs ' if c.cuda else ''}fp32)", batch=b,
              ratio=lat.get("ratio"), ratio_ci95_low=lo, ratio_ci95_high=hi, rounds=rounds,
              prediction_agreement=res.agreement)
        c.say(f"  {case.name} batch {b}: adapted/unadapted {lat.get('ratio', math.nan):.3f} ({lo:.3f}-{hi:.3f})")


