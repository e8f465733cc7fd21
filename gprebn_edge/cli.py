"""`gprebn-edge`: a thin command-line skin over the library. Each command parses, checks its flags, calls
one library function and prints. Errors the user can fix are one line on stderr and exit code 1; the
traceback only with --debug."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gprebn_edge.errors import ArtifactError, GprebnError

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="GpreBN test-time adaptation of BatchNorm CNNs, folded for edge GPUs.")
# user text (paths, specs like synthetic:fog:5, extras like gprebn-edge[vision]) must print as written:
# no rich markup and no :emoji: codes
console = Console(markup=False, emoji=False)
err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)
_state = {"debug": False}


def _error_line(label: str, message: str) -> Text:
    return Text.assemble((label, "red"), " ", message)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


@contextlib.contextmanager
def cli_errors(interrupted: str = "interrupted: nothing was written") -> Iterator[None]:
    """Map the project's errors to one line and exit code 1; anything else to exit code 2; Ctrl-C to 130
    with the line `interrupted`."""
    try:
        yield
    except GprebnError as e:
        if _state["debug"]:
            raise
        err_console.print(_error_line("error:", str(e)), soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print(interrupted, soft_wrap=True)
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:  # a bug, not a user error: still one line unless --debug
        if _state["debug"]:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        err_console.print(_error_line("internal error:", f"{type(e).__name__}: {first} (rerun with --debug for "
                                      "the traceback and report it)"), soft_wrap=True)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _progress(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Yield update(description, done, total); the bar appears on the first update, so a command that fails
    while loading prints its one error line and nothing else."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar: Progress | None = None
    task = None

    def update(description: str, done: int, total: int) -> None:
        nonlocal bar, task
        if not enabled:
            return
        if bar is None:
            bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), console=err_console, transient=True)
            bar.start()
            task = bar.add_task(description, total=total)
        assert task is not None
        bar.update(task, description=description, completed=done, total=total)

    try:
        yield update
    finally:
        if bar is not None:
            bar.stop()


@contextlib.contextmanager
def _status() -> Iterator[Callable[[str], None]]:
    """Yield say(message): a transient spinner line on stderr for work without a count of steps."""
    status = None

    def say(message: str) -> None:
        nonlocal status
        if status is None:
            status = err_console.status(message)
            status.start()
        else:
            status.update(message)

    try:
        yield say
    finally:
        if status is not None:
            status.stop()


def _key_value_table(title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")  # paths and hashes wrap whole, never cut with an ellipsis
    return table


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


@app.command()
def adapt(
    model: Annotated[str, typer.Option(help="builtin:NAME, torchvision:NAME, path/to/file.py:factory or "
                                       "package.module:factory.")],
    data: Annotated[str, typer.Option(help="Calibration images: a folder (class subfolders = labels), "
                                      ".npy/.npz, or synthetic:DOMAIN[:SEVERITY].")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Adapted checkpoint (.safetensors).")],
    weights: Annotated[str | None, typer.Option(help="Source weights: safetensors or a torch state dict.")] = None,
    method: Annotated[str, typer.Option(help="gprebn, tent, adabn, bn or source.")] = "gprebn",
    batch_size: Annotated[int, typer.Option(help="Calibration batch size (one step per batch).")] = 64,
    lr: Annotated[float, typer.Option(help="Learning rate at batch 64 (scaled for other batch sizes).")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adam or sgd (momentum 0.9).")] = "adam",
    lr_scaling: Annotated[str, typer.Option(help="sqrt (lr x sqrt(batch/64), Adam betas per image), linear "
                                            "(lr x batch/64) or none.")] = "sqrt",
    momentum: Annotated[str, typer.Option(help="Statistics: 'cumulative' or an EMA rate per 64 images.")]
    = "cumulative",
    theta: Annotated[float, typer.Option(help="Weight of target statistics vs source statistics.")] = 1.0,
    stats_init: Annotated[str, typer.Option(help="Target estimate starts from: first (batch) or source.")]
    = "first",
    stats_order: Annotated[str, typer.Option(help="Update statistics before or after normalizing a batch.")]
    = "before",
    freeze: Annotated[str | None, typer.Option(help="refresh (re-estimate statistics with a final pass) or "
                                               "direct; default: the method's own.")] = None,
    resize: Annotated[int | None, typer.Option(help="Resize the shorter side to N pixels.")] = None,
    crop: Annotated[int | None, typer.Option(help="Center-crop to N x N pixels.")] = None,
    mean: Annotated[str | None, typer.Option(help="Per-channel mean for pixels in [0,1], e.g. 0.485,0.456,0.406.")]
    = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std for pixels in [0,1].")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Passed to the model factory.")] = None,
    shuffle: Annotated[bool, typer.Option(help="Read a folder in a seeded shuffled order (--no-shuffle keeps "
                                          "file order, as a live stream).")] = True,
    limit: Annotated[int | None, typer.Option(help="Use at most N calibration images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for shuffling and adaptation.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Adapt a BatchNorm model to unlabeled target images and write the adapted checkpoint."""
    from gprebn_edge.adapt import AdaptConfig, adapt_to_file
    from gprebn_edge.data.preprocess import parse_triple
    from gprebn_edge.methods import StatsConfig

    with cli_errors():
        stats = StatsConfig(momentum=_parse_momentum(momentum), theta=theta, init=stats_init, order=stats_order)
        config = AdaptConfig(method=method, batch_size=batch_size, lr=lr, optimizer=optimizer,
                             lr_scaling=lr_scaling, stats=stats, freeze=freeze, seed=seed)
        preprocess = {"resize": resize, "crop": crop,
                      "mean": parse_triple(mean, "mean") if mean else None,
                      "std": parse_triple(std, "std") if std else None}
        with _progress(enabled=not as_json) as update:
            result = adapt_to_file(model, data, output, config, weights=weights, num_classes=num_classes,
                                   preprocess=preprocess, shuffle=shuffle, limit=limit,
                                   progress=lambda done, total: update(f"adapting ({method})", done, total))
        s = result.summary
        if as_json:
            typer.echo(json.dumps({"output": str(output), **s}, indent=2))
            return
        table = _key_value_table(f"adapted {model} with {method} -> {output}")
        table.add_row("calibration images", f"{s['images']} ({s['skipped']} unreadable, skipped)")
        table.add_row("steps", str(s["steps"]))
        table.add_row("online error", _pct(s["online_error"]))
        before, after = s["calibration_before"], s["calibration_after"]
        table.add_row("mean entropy before -> after", f"{before['entropy']:.3f} -> {after['entropy']:.3f}")
        if before["error"] is not None:
            table.add_row("calibration error before -> after", f"{_pct(before['error'])} -> {_pct(after['error'])}")
        table.add_row("time", f"{s['seconds']:.1f} s")
        console.print(table)


def _parse_momentum(text: str) -> float | None:
    if text == "cumulative":
        return None
    try:
        return float(text)
    except ValueError:
        raise GprebnError(f"--momentum must be 'cumulative' or a number in (0, 1], got {text!r}") from None


@app.command()
def info(
    artifact: Annotated[Path, typer.Argument(help="An adapted checkpoint (.safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole metadata as JSON.")] = False,
) -> None:
    """Show what an artifact holds: model, preprocessing, method, calibration data, what changed."""
    from gprebn_edge.checkpoint import load_checkpoint

    with cli_errors():
        state, meta = load_checkpoint(artifact)
        if as_json:
            meta = {k: v for k, v in meta.items() if k != "source_bn"}
            typer.echo(json.dumps(meta, indent=2))
            return
        try:
            table = _info_table(artifact, state, meta)
        except (KeyError, TypeError, IndexError) as e:
            raise ArtifactError(f"{artifact} metadata lacks {e} or has it in the wrong form: it was not written "
                                "by this version of gprebn-edge adapt (info --json shows what it holds)") from None
        console.print(table)


def _info_table(path: Path, state: dict, meta: dict[str, Any]) -> Table:
    table = _key_value_table(str(path))
    m, p, method, cal, s = meta["model"], meta["preprocess"], meta["method"], meta["calibration"], meta["summary"]
    table.add_row("model", f"{m['spec']} ({meta['num_classes']} classes)")
    table.add_row("source weights", f"{m.get('weights') or '-'} {m.get('weights_sha256') or ''}")
    table.add_row("tensors", f"{len(state)} ({sum(t.numel() for t in state.values()):,} values)")
    table.add_row("preprocess", f"resize {p['resize']}, crop {p['crop']}, mean {p['mean']}, std {p['std']}")
    table.add_row("method", ", ".join(f"{k}={v}" for k, v in method.items()))
    table.add_row("calibration", f"{cal['spec']}: {s['images']} images, {cal.get('skipped', 0)} skipped, "
                  f"{cal['fingerprint'][:23]}...")
    table.add_row("online error", _pct(s["online_error"]))
    before, after = s["calibration_before"], s["calibration_after"]
    table.add_row("entropy before -> after", f"{before['entropy']:.3f} -> {after['entropy']:.3f}")
    shift = sorted(meta["statistics_shift"], key=lambda r: -r["mean_shift"])[:3]
    table.add_row("largest statistics shift", "; ".join(
        f"{r['layer']}: mean {r['mean_shift']:.2f} sd, std x{r['std_ratio']:.2f}" for r in shift))
    table.add_row("created", f"{meta['created']} by gprebn-edge {meta['gprebn_edge_version']}")
    return table


@app.command()
def export(
    artifact: Annotated[Path, typer.Argument(help="An adapted checkpoint (.safetensors).")],
    onnx: Annotated[Path | None, typer.Option(help="ONNX output (default: next to the artifact).")] = None,
    unadapted: Annotated[bool, typer.Option(help="Export the source model through the same path.")] = False,
    data: Annotated[str | None, typer.Option(help="Images to check ONNX against PyTorch on (default: the "
                                             "artifact's calibration data).")] = None,
    check_images: Annotated[int, typer.Option(help="How many images the parity check uses.")] = 1000,
    trt: Annotated[bool, typer.Option("--trt", help="Also build a TensorRT engine (needs TensorRT 10 and a GPU: "
                                      "build it on the device that will run it).")] = False,
    engine: Annotated[Path | None, typer.Option(help="Engine output (default: the ONNX path with .engine).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Engine in fp16.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Engine in int8, calibrated on the check images.")] = False,
    refittable: Annotated[bool, typer.Option("--refittable", help="Engine with the REFIT flag (for the device "
                                             "loop, which refits new weights by name).")] = False,
    batch: Annotated[str, typer.Option(help="Engine batch profile MIN:OPT:MAX (or N).")] = "1:1:32",
    workspace_mb: Annotated[int, typer.Option(help="TensorRT workspace memory limit in MiB.")] = 1024,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Fold BatchNorm into the convs and export ONNX, checked against PyTorch with onnxruntime; with --trt,
    also build a TensorRT engine from it."""
    from gprebn_edge.export.pipeline import EngineOptions, export_artifact
    from gprebn_edge.export.tensorrt_build import parse_batch_range

    with cli_errors():
        if check_images < 1:
            raise GprebnError(f"--check-images must be at least 1, got {check_images}")
        engine_flags = [name for name, on in (("--engine", engine is not None), ("--fp16", fp16), ("--int8", int8),
                                              ("--refittable", refittable)) if on]
        if engine_flags and not trt:
            raise GprebnError(f"{', '.join(engine_flags)} only apply to engines: add --trt")
        if fp16 and int8:
            raise GprebnError("choose one of --fp16 and --int8 (int8 layers that cannot run in int8 run in fp32)")
        options = None
        if trt:
            options = EngineOptions(engine=engine, precision="fp16" if fp16 else "int8" if int8 else "fp32",
                                    batch=parse_batch_range(batch), refittable=refittable, workspace_mb=workspace_mb)
        with _status() as say:
            manifest = export_artifact(artifact, onnx, unadapted=unadapted, data=data, check_images=check_images,
                                       engine=options, progress=say)
        if as_json:
            typer.echo(json.dumps(manifest, indent=2))
            return
        p, fold = manifest["parity"], manifest["fold"]
        table = _key_value_table(f"exported {manifest['model']} model of {artifact}")
        table.add_row("onnx", manifest["onnx"])
        table.add_row("BatchNorm folded / kept", f"{len(fold['folded'])} / {len(fold['skipped'])} (in {fold['where']})")
        for bn in fold["skipped"]:
            table.add_row("kept", f"{bn['bn']}: {bn['reason']}")
        table.add_row("parity vs PyTorch", f"{p['images']} images: max abs {p['max_abs']:.2e}, max rel "
                      f"{p['max_rel']:.2e} (limit {p['limit']:.0e}), top-1 agreement {100 * p['top1_agreement']:.2f} %")
        for w in manifest["warnings"]:
            table.add_row("warning", w)
        if manifest["tensorrt"]:
            t = manifest["tensorrt"]
            table.add_row("engine", f"{t['engine']} ({t.get('precision')}, TensorRT {t.get('tensorrt')}, "
                          f"{t.get('gpu')})")
        table.add_row("time", f"{manifest['seconds']:.1f} s")
        console.print(table)


def _batch_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise GprebnError(f"--batch must be positive integers separated by commas (e.g. 1,32), got {text!r}")
    return values


_BACKEND_HELP = "auto (by suffix: .onnx onnxruntime, .engine/.plan tensorrt, .safetensors torch), onnxruntime, " \
                "torch or tensorrt."


@app.command()
def bench(
    model: Annotated[Path, typer.Argument(help="An ONNX file, a TensorRT engine or an adapted checkpoint.")],
    backend: Annotated[str, typer.Option(help=_BACKEND_HELP)] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cpu; cuda for engines).")] = None,
    batch: Annotated[str, typer.Option(help="Batch size(s), comma-separated, e.g. 1,32.")] = "1",
    warmup: Annotated[str, typer.Option(help="Warm-up: iterations (10) or seconds (2s).")] = "10",
    iters: Annotated[int | None, typer.Option(help="Timed iterations (default 200).")] = None,
    duration: Annotated[float | None, typer.Option(help="Time for this many seconds instead of --iters.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (onnxruntime intra-op, torch).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="fp16 (torch on CUDA; onnxruntime TensorRT provider).")] = False,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="Replay CUDA graphs (torch, tensorrt).")] = False,
    input_shape: Annotated[str | None, typer.Option(help="C,H,W where the model does not fix it.")] = None,
    data: Annotated[str | None, typer.Option(help="Time on these images instead of random inputs.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a latency plot (PNG) here.")] = None,
) -> None:
    """Latency of one model: first call, percentiles, throughput, memory and the environment."""
    from gprebn_edge.runtime.bench import format_table
    from gprebn_edge.runtime.tasks import RunnerOptions, bench_model, parse_shape

    with cli_errors():
        if iters is not None and duration is not None:
            raise GprebnError("give --iters or --duration, not both")
        if (iters is not None and iters < 1) or (duration is not None and duration <= 0):
            raise GprebnError("--iters must be at least 1 and --duration positive")
        options = RunnerOptions(backend=backend, device=device, threads=threads, fp16=fp16, cuda_graphs=cuda_graphs,
                                input_shape=parse_shape(input_shape) if input_shape else None)
        batches = _batch_list(batch)
        _check_outputs(json_out, plot)
        with _progress() as update:
            results = bench_model(model, options, batches=batches, warmup=warmup, iters=iters, duration=duration,
                                  data=data, progress=update)
        for result in results:
            console.print(format_table(result))
        env = results[0].environment
        console.print("environment: " + ", ".join(f"{k} {v}" for k, v in _flat_environment(env).items()),
                      soft_wrap=True)
        if json_out is not None:
            from gprebn_edge.io import write_text_atomic

            payload = {"model": str(model), "results": [r.to_dict() for r in results]}
            write_text_atomic(json_out, json.dumps(payload, indent=1) + "\n")
            console.print(f"json: {json_out}")
        if plot is not None:
            from gprebn_edge.runtime.latency_plot import plot_latency

            plot_latency(results, plot, labels=[r.label() for r in results], title=model.name)
            console.print(f"plot: {plot}")


def _check_outputs(*paths: Path | None) -> None:
    """Fail before any work when an output cannot be written."""
    for path in paths:
        if path is not None and (path.is_dir() or not (path.parent if str(path.parent) else Path(".")).is_dir()):
            raise GprebnError(f"cannot write {path}: give a file in an existing folder")


def _flat_environment(env: dict[str, Any]) -> dict[str, Any]:
    keep = ("cpu", "cpu_count", "gpu", "cuda", "onnxruntime", "torch", "tensorrt", "jetson")
    flat: dict[str, Any] = {}
    for key, value in env.items():
        if isinstance(value, dict):
            flat.update({k: v for k, v in value.items() if k in keep and v is not None})
        elif key in keep and value is not None:
            flat[key] = value
    return flat


@app.command()
def compare(
    model_a: Annotated[Path, typer.Argument(help="Model A (typically the unadapted export).")],
    model_b: Annotated[Path, typer.Argument(help="Model B (typically the adapted export).")],
    data: Annotated[str, typer.Option(help="Images both run on (folder, .npy/.npz, synthetic:...); class "
                                      "subfolders give accuracy.")],
    backend_a: Annotated[str, typer.Option(help="Backend for A: " + _BACKEND_HELP)] = "auto",
    backend_b: Annotated[str, typer.Option(help="Backend for B.")] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N for both.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads per model.")] = None,
    batch: Annotated[int, typer.Option(help="Batch size for the accuracy pass.")] = 32,
    limit: Annotated[int | None, typer.Option(help="Use at most this many images.")] = None,
    latency_iters: Annotated[int, typer.Option(help="Interleaved A/B latency rounds (0: none).")] = 50,
    latency_batch: Annotated[int, typer.Option(help="Batch size of the latency rounds.")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the comparison as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write reliability diagrams and bars (PNG) here.")] = None,
) -> None:
    """Two models on the same data: accuracy, agreement, entropy, confidence, calibration error, per-class
    accuracy, and latency measured interleaved A/B/B/A so that machine drift cancels."""
    from gprebn_edge.runtime.compare import write_json
    from gprebn_edge.runtime.tasks import RunnerOptions, compare_models

    with cli_errors():
        _check_outputs(json_out, plot)
        options = [RunnerOptions(backend=b, device=device, threads=threads) for b in (backend_a, backend_b)]
        with _progress() as update:
            result = compare_models(model_a, model_b, data, options_a=options[0], options_b=options[1], batch=batch,
                                    limit=limit, latency_iters=latency_iters, latency_batch=latency_batch,
                                    progress=update)
        console.print(result.to_markdown(), soft_wrap=True)
        if json_out is not None:
            write_json(result, json_out)
            console.print(f"json: {json_out}")
        if plot is not None:
            from gprebn_edge.runtime.compare_plot import plot_compare

            plot_compare(result, plot)
            console.print(f"plot: {plot}")


@app.command()
def loop(
    source: Annotated[str, typer.Option(help="Frames, served in order: an image folder, .npy/.npz, synthetic:..., "
                                        "stream[:SEGMENTS] (the built-in shifting stream), video:FILE or camera:N.")],
    state: Annotated[Path, typer.Option(help="Folder for the last good checkpoint, its export, state.json and "
                                        "metrics.jsonl; a restart with the same folder resumes.")],
    model: Annotated[Path | None, typer.Option(help="Adapted checkpoint to keep adapting (without it the loop "
                                               "only serves).")] = None,
    onnx: Annotated[Path | None, typer.Option(help="ONNX file that serves at first (default: exported from "
                                              "--model).")] = None,
    engine: Annotated[Path | None, typer.Option(help="A refittable TensorRT engine to serve instead.")] = None,
    every: Annotated[int | None, typer.Option(help="Frames between adaptation rounds (default 500).")] = None,
    interval: Annotated[float | None, typer.Option(help="Or seconds between adaptation rounds.")] = None,
    buffer: Annotated[int, typer.Option(help="Recent frames kept for adaptation (a sliding window).")] = 512,
    holdout: Annotated[float, typer.Option(help="Newest fraction of the buffer held back for the gates.")] = 0.25,
    probe: Annotated[str | None, typer.Option(help="Labeled images for the probe-accuracy gate.")] = None,
    recovery: Annotated[int, typer.Option(help="Failed candidates in a row before adaptation restarts from the "
                                          "last good checkpoint.")] = 3,
    frames: Annotated[int | None, typer.Option("--frames", help="Stop after this many frames in all.")] = None,
    fps: Annotated[float | None, typer.Option(help="Pace a file or built-in source at this frame rate.")] = None,
    window: Annotated[int, typer.Option(help="Frames per metrics record.")] = 250,
    lr: Annotated[float, typer.Option(help="GpreBN learning rate (at batch 64).")] = 1e-3,
    adapt_threads: Annotated[int, typer.Option(help="torch threads for the background adaptation.")] = 1,
    serve_threads: Annotated[int, typer.Option(help="onnxruntime threads for serving.")] = 1,
) -> None:
    """Serve frames with the current model while re-adapting it in the background; swap in a candidate only
    after it passed its gates; persist and resume."""
    from gprebn_edge.runtime.loop import LoopConfig, run_loop

    with cli_errors(f"interrupted: the state in {state} is servable; run the same command again to resume"):
        config = LoopConfig(state=state, source=source, model=model, onnx=onnx, engine=engine,
                            every=every if every is not None or interval is not None else 500, interval=interval,
                            buffer=buffer, holdout=holdout, probe=probe, recovery=recovery, max_frames=frames,
                            fps=fps, window=window, lr=lr, adapt_threads=adapt_threads, serve_threads=serve_threads)
        with _status() as say:
            def on_window(r: dict[str, Any]) -> None:
                acc = "" if not r["labeled"] else f", accuracy {100 * r['correct'] / r['labeled']:.1f} %"
                say(f"{r['frames']} frames, serving round {r['served_round']}, p50 {r['latency_ms']['p50']:.2f} ms"
                    f"{acc}, entropy {r['mean_entropy']:.3f}")

            result = run_loop(config, on_window=on_window)
        skipped = f", {result.skipped} unreadable skipped" if result.skipped else ""
        console.print(f"{'resumed, ' if result.resumed else ''}{result.frames} frames ({result.stop_reason}{skipped}); "
                      f"rounds {result.rounds}, passed {result.passed}, swaps {result.swaps}, rollbacks "
                      f"{result.rollbacks}; serving round {result.served_round}; {result.seconds:.1f} s",
                      soft_wrap=True)
        console.print(f"log: {result.log}  (gprebn-edge loop-report {result.log})", soft_wrap=True)


@app.command("loop-report")
def loop_report(
    log: Annotated[Path, typer.Argument(help="A loop's metrics.jsonl.")],
    plot: Annotated[Path | None, typer.Option(help="Write accuracy/latency over time (PNG) here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the summary as JSON here.")] = None,
) -> None:
    """Summarize a loop run: frames, rounds, swaps, rollbacks, accuracy per segment, latency while adapting."""
    from gprebn_edge.runtime.loop_report import format_summary, plot_loop, read_log, summarize, summary_to_json

    with cli_errors():
        _check_outputs(plot, json_out)
        parsed = read_log(log)
        summary = summarize(parsed)
        console.print(format_summary(summary), soft_wrap=True)
        if json_out is not None:
            from gprebn_edge.io import write_text_atomic

            write_text_atomic(json_out, summary_to_json(summary) + "\n")
            console.print(f"json: {json_out}")
        if plot is not None:
            plot_loop(parsed, plot)
            console.print(f"plot: {plot}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's report.")] = Path("demo_out"),
    quick: Annotated[bool, typer.Option(help="Fewer images (for tests).")] = False,
    shifts: Annotated[str | None, typer.Option(help="Comma-separated built-in shifts at severity 5 ('style' is "
                                               "the natural-style shift); default: three noises, fog, contrast, "
                                               "style.")] = None,
) -> None:
    """The whole chain on built-in data: adapt the built-in model with GpreBN to corrupted images, export the
    unadapted and the adapted model as folded ONNX, compare and benchmark them with onnxruntime."""
    from gprebn_edge.demo import run_demo

    with cli_errors():
        with _progress() as update:
            domains = tuple(s.strip() for s in shifts.split(",")) if shifts else None
            report = run_demo(out, quick=quick, domains=domains, progress=update)
        table = Table(title="error of the unadapted and adapted ONNX on held-out images (onnxruntime)")
        for col in ("shift", "unadapted", "adapted", "agree", "latency", "parity"):
            table.add_column(col, justify="left" if col == "shift" else "right", no_wrap=True)
        for r in report["rows"]:
            table.add_row(r["domain"], _pct(r["source_error"]), _pct(r["adapted_error"]),
                          f"{100 * r['agreement']:.0f} %", f"{r['latency_ratio']:.3f}", f"{r['parity_max_rel']:.0e}")
        table.caption = ("agree: same top-1 class; latency: adapted / unadapted, interleaved; parity: max relative "
                         "logit error of ONNX vs PyTorch (top-1 agreement 100 % on every export)")
        console.print(table)
        for b in report["bench"]["rows"]:
            console.print(f"bench batch {b['batch']:>2}: p50 unadapted {b['unadapted_p50_ms']:.3f} ms, adapted "
                          f"{b['adapted_p50_ms']:.3f} ms, ratio {b['ratio_p50']:.3f}")
        t = report["tensorrt"]
        console.print(f"TensorRT: {t['status']}" + (f" ({t['reason']})" if t.get("reason") else ""), soft_wrap=True)
        console.print(f"report: {report['report']}  plots: {', '.join(report['plots'][:2])} (+ one per shift)  "
                      f"({report['seconds']:.1f} s)", soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except GprebnError as e:  # raised outside a command body (e.g. while parsing)
        err_console.print(_error_line("error:", str(e)), soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
