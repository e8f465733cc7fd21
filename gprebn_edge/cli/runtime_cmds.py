"""`bench` and `compare`: the runtime stage's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gprebn_edge.cli._app import command, console, progress
from gprebn_edge.cli.options import BACKEND_HELP, Backend, Device, JsonOut, Limit, Threads, TrustModelCode, Verify
from gprebn_edge.cli.output import check_outputs, emit_json, existing, json_to_stdout, note, say_replaced
from gprebn_edge.errors import GprebnError
from gprebn_edge.io import strict_json
from gprebn_edge.stages import CHECKPOINTS, fold_as_exported
from gprebn_edge.validate import flag_number


def _batch_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise GprebnError(f"--batch must be positive integers separated by commas (e.g. 1,32), got {text!r}")
    return values


Providers = Annotated[str | None, typer.Option(help="onnxruntime providers for an .onnx file, tried in order, e.g. "
                                              "tensorrt,cuda (default: cpu, or cuda with --device cuda).")]
EngineCache = Annotated[Path | None, typer.Option(help="Folder for the engines and timing cache of onnxruntime's "
                                                  "TensorRT provider (built once, reused).")]


@command()
def bench(
    model: Annotated[Path, typer.Argument(help="An ONNX file, a TensorRT engine or an adapted checkpoint.")],
    backend: Backend = "auto",
    device: Device = None,
    batch: Annotated[str, typer.Option(help="Batch size(s), comma-separated, e.g. 1,32.")] = "1",
    warmup: Annotated[str, typer.Option(help="Warm-up: iterations (10) or seconds (2s).")] = "10",
    iters: Annotated[int | None, typer.Option(help="Timed iterations (default 200).")] = None,
    duration: Annotated[float | None, typer.Option(help="Time for this many seconds instead of --iters.")] = None,
    threads: Threads = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="fp16 (torch on CUDA; onnxruntime TensorRT provider).")] = False,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="Replay CUDA graphs (torch).")] = False,
    providers: Providers = None,
    engine_cache: EngineCache = None,
    input_shape: Annotated[str | None, typer.Option(help="C,H,W where the model does not fix it.")] = None,
    data: Annotated[str | None, typer.Option(help="Time on these images instead of random inputs.")] = None,
    json_out: JsonOut = None,
    plot: Annotated[Path | None, typer.Option(help="Write a latency plot (PNG) here.")] = None,
    trust_model_code: TrustModelCode = False,
    verify: Verify = True,
) -> None:
    """Latency of one model: first call, percentiles, throughput, memory and the environment."""
    from gprebn_edge.consent import CodeConsent
    from gprebn_edge.runtime.bench import format_table
    from gprebn_edge.runtime.ort_runner import parse_providers
    from gprebn_edge.runtime.tasks import RunnerOptions, bench_model, parse_shape

    if iters is not None and duration is not None:
        raise GprebnError("give --iters or --duration, not both")
    if (iters is not None and iters < 1) or (duration is not None and duration <= 0):
        raise GprebnError("--iters must be at least 1 and --duration positive")
    flag_number(duration, "--duration", positive=True)  # NaN passes the comparisons above
    flag_number(threads, "--threads", low=1)
    options = RunnerOptions(backend=backend, device=device, threads=threads, fp16=fp16, cuda_graphs=cuda_graphs,
                            input_shape=parse_shape(input_shape) if input_shape else None,
                            consent=CodeConsent(any_code=trust_model_code), verify=verify, prepare=fold_as_exported,
                            checkpoints=CHECKPOINTS,
                            providers=parse_providers(providers) if providers else None, engine_cache=engine_cache)
    batches = _batch_list(batch)
    check_outputs(json_out, plot)
    replaced = existing(json_out, plot)
    with progress() as update:
        results = bench_model(model, options, batches=batches, warmup=warmup, iters=iters, duration=duration,
                              data=data, progress=update)
    if not json_to_stdout(json_out):
        for result in results:
            console.print(format_table(result))
        console.print("environment: " + ", ".join(f"{k} {v}" for k, v in _flat_environment(results[0].environment)
                                                  .items()), soft_wrap=True)
    emit_json(json_out, strict_json({"model": str(model), "results": [r.to_dict() for r in results]}, indent=1))
    if plot is not None:
        from gprebn_edge.runtime.latency_plot import plot_latency

        plot_latency(results, plot, labels=[r.label() for r in results], title=model.name)
        note(f"plot: {plot}", json_out)
    say_replaced(replaced)


def _flat_environment(env: dict[str, Any]) -> dict[str, Any]:
    keep = ("cpu", "cpu_count", "gpu", "cuda", "onnxruntime", "torch", "tensorrt", "jetson")
    flat: dict[str, Any] = {}
    for key, value in env.items():
        if isinstance(value, dict):
            flat.update({k: v for k, v in value.items() if k in keep and v is not None})
        elif key in keep and value is not None:
            flat[key] = value
    return flat


@command()
def compare(
    model_a: Annotated[Path, typer.Argument(help="Model A (typically the unadapted export).")],
    model_b: Annotated[Path, typer.Argument(help="Model B (typically the adapted export).")],
    data: Annotated[str, typer.Option(help="Images both run on (folder, .npy/.npz, synthetic:...); class "
                                      "subfolders give accuracy.")],
    backend_a: Annotated[str, typer.Option(help="Backend for A: " + BACKEND_HELP)] = "auto",
    backend_b: Annotated[str, typer.Option(help="Backend for B.")] = "auto",
    device: Device = None,
    threads: Threads = None,
    providers: Providers = None,
    engine_cache: EngineCache = None,
    batch: Annotated[int, typer.Option(help="Batch size for the accuracy pass.")] = 32,
    limit: Limit = None,
    latency_iters: Annotated[int, typer.Option(help="Interleaved A/B latency rounds (0: none).")] = 50,
    latency_batch: Annotated[int, typer.Option(help="Batch size of the latency rounds.")] = 1,
    json_out: JsonOut = None,
    plot: Annotated[Path | None, typer.Option(help="Write reliability diagrams and bars (PNG) here.")] = None,
    trust_model_code: TrustModelCode = False,
    verify: Verify = True,
) -> None:
    """Two models on the same data: accuracy, agreement, entropy, confidence, calibration error, per-class
    accuracy, and latency measured interleaved A/B/B/A so that machine drift cancels."""
    from gprebn_edge.consent import CodeConsent
    from gprebn_edge.runtime.ort_runner import parse_providers
    from gprebn_edge.runtime.tasks import RunnerOptions, compare_models

    check_outputs(json_out, plot)
    replaced = existing(json_out, plot)
    consent = CodeConsent(any_code=trust_model_code)
    for value, flag, low in ((threads, "--threads", 1), (batch, "--batch", 1), (limit, "--limit", 1),
                             (latency_iters, "--latency-iters", 0), (latency_batch, "--latency-batch", 1)):
        flag_number(value, flag, low=low)
    onnx_providers = parse_providers(providers) if providers else None
    options = [RunnerOptions(backend=b, device=device, threads=threads, consent=consent, verify=verify,
                             prepare=fold_as_exported, checkpoints=CHECKPOINTS, providers=onnx_providers,
                             engine_cache=engine_cache) for b in (backend_a, backend_b)]
    with progress() as update:
        result = compare_models(model_a, model_b, data, options_a=options[0], options_b=options[1], batch=batch,
                                limit=limit, latency_iters=latency_iters, latency_batch=latency_batch,
                                progress=update)
    if not json_to_stdout(json_out):
        console.print(result.to_markdown(), soft_wrap=True)
    emit_json(json_out, strict_json(result.to_dict(), indent=2, default=str))
    if plot is not None:
        from gprebn_edge.runtime.compare_plot import plot_compare

        plot_compare(result, plot)
        note(f"plot: {plot}", json_out)
    say_replaced(replaced)
