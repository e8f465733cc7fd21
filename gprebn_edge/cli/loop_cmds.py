"""`loop` and `loop-report`: the device loop's commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gprebn_edge.cli import _app
from gprebn_edge.cli._app import command, console, err_console, error_line, session, status
from gprebn_edge.cli.options import JsonOut, TrustModelCode, Verify
from gprebn_edge.cli.output import check_outputs, emit_json, existing, json_to_stdout, note, say_replaced
from gprebn_edge.device.config import DEFAULT_EVERY, LoopConfig, default
from gprebn_edge.device.stop import StopToken


def _d(name: str) -> Any:
    return default(name)


@command()
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
    every: Annotated[int | None, typer.Option(help=f"Frames between adaptation rounds (default {DEFAULT_EVERY})."
                                              )] = _d("every"),
    interval: Annotated[float | None, typer.Option(help="Or seconds between adaptation rounds.")] = _d("interval"),
    buffer: Annotated[int, typer.Option(help="Recent frames kept for adaptation (a sliding window).")] = _d("buffer"),
    holdout: Annotated[float, typer.Option(help="Newest fraction of the buffer held back for the gates.")
                       ] = _d("holdout"),
    probe: Annotated[str | None, typer.Option(help="Labeled images for the probe-accuracy gate.")] = None,
    recovery: Annotated[int, typer.Option(help="Failed candidates in a row before adaptation restarts from the "
                                          "last good checkpoint.")] = _d("recovery"),
    frames: Annotated[int | None, typer.Option("--frames", help="Stop after this many frames in all.")] = None,
    fps: Annotated[float | None, typer.Option(help="Pace a file or built-in source at this frame rate.")] = None,
    window: Annotated[int, typer.Option(help="Frames per metrics record.")] = _d("window"),
    lr: Annotated[float, typer.Option(help="GpreBN learning rate (at batch 64).")] = _d("lr"),
    adapt_threads: Annotated[int, typer.Option(help="torch threads for the background adaptation.")
                             ] = _d("adapt_threads"),
    serve_threads: Annotated[int, typer.Option(help="onnxruntime threads for serving.")] = _d("serve_threads"),
    shift_trigger: Annotated[bool, typer.Option(help="Also start a round early when the inputs or the serving "
                                                "model's outputs shift (the log says why each round started).")] = True,
    predictions: Annotated[str | None, typer.Option(help="Write one JSON line per served frame (frame, source "
                                                    "name, class, confidence, serving round) to this file (rotated "
                                                    "like the metrics log), or - for stdout.")] = None,
    publish: Annotated[str | None, typer.Option(help="DIR[:NAME]: write every model that passed its gates into a "
                                                "Triton model repository DIR/NAME (docs/serving.md).")] = None,
    keep: Annotated[int, typer.Option(help="Published versions kept (older ones are deleted).")] = _d("keep"),
    max_memory: Annotated[str | None, typer.Option(help="Peak memory the whole process may use while a round "
                                                   "runs beside serving, e.g. 2GB: rounds take micro-batches "
                                                   "(docs/budget.md).")] = None,
    trust_model_code: TrustModelCode = False,
    verify: Verify = True,
) -> None:
    """Serve frames with the current model while re-adapting it in the background; swap in a candidate only
    after it passed its gates; persist and resume."""
    session.interrupted = f"interrupted: the state in {state} is servable; run the same command again to resume"
    from gprebn_edge.budget import parse_size
    from gprebn_edge.consent import CodeConsent
    from gprebn_edge.device.shift import ShiftConfig

    config = LoopConfig(state=state, source=source, model=model, onnx=onnx, engine=engine, every=every,
                        interval=interval, buffer=buffer, holdout=holdout, probe=probe, recovery=recovery,
                        max_frames=frames, fps=fps, window=window, lr=lr, adapt_threads=adapt_threads,
                        serve_threads=serve_threads, consent=CodeConsent(any_code=trust_model_code), verify=verify,
                        shift=ShiftConfig() if shift_trigger else None, predictions=predictions, publish=publish,
                        keep=keep, max_memory=parse_size(max_memory) if max_memory is not None else None)
    with _app.cooperative_stop() as stop:
        _run(config, stop)


def _run(config: LoopConfig, stop: StopToken) -> None:
    from gprebn_edge.device.loop import run_loop

    out = err_console if config.predictions == "-" else console  # stdout carries the predictions
    with status() as say:
        def on_window(r: dict[str, Any]) -> None:
            acc = "" if not r["labeled"] else f", accuracy {100 * r['correct'] / r['labeled']:.1f} %"
            say(f"{r['frames']} frames, serving round {r['served_round']}, p50 {r['latency_ms']['p50']:.2f} ms"
                f"{acc}, entropy {r['mean_entropy']:.3f}")

        def on_notice(message: str) -> None:
            err_console.print(error_line("error:", message), soft_wrap=True)

        result = run_loop(config, on_window=on_window, on_notice=on_notice, stop=stop)
    skipped = f", {result.skipped} unreadable skipped" if result.skipped else ""
    peak = "" if result.peak_rss is None else f"; peak RSS {result.peak_rss / 1e9:.2f} GB"
    out.print(f"{'resumed, ' if result.resumed else ''}{result.frames} frames ({result.stop_reason}{skipped}); "
              f"rounds {result.rounds}, passed {result.passed}, swaps {result.swaps}, rollbacks "
              f"{result.rollbacks}, fallbacks {result.fallbacks}; serving round {result.served_round}; "
              f"{result.seconds:.1f} s{peak}", soft_wrap=True)
    out.print(f"log: {result.log}  (gprebn-edge loop-report {result.log})", soft_wrap=True)
    if result.worker_abandoned:
        # the worker is still inside torch: a normal interpreter exit would abort in its native thread pool
        # ("terminate called without an active exception"); everything on disk is closed, so leave at once
        err_console.print(error_line("error:", "the adaptation worker did not stop in time; exiting without "
                                     "waiting for it (the state folder is servable)"), soft_wrap=True)
        signum = _app.signal_received()
        _exit_now(128 + signum if signum is not None and stop.interrupted else 1)
    if stop.interrupted:  # the loop stopped as asked: cli_errors says so in one line, exit 130/143
        raise KeyboardInterrupt
    if result.errors:  # each was reported when it happened; serving went on, but the command failed
        more = f" (and {len(result.errors) - 1} more, in the log)" if len(result.errors) > 1 else ""
        err_console.print(error_line("error:", f"{result.errors[0]}{more}"), soft_wrap=True)
        raise typer.Exit(1)


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@command("loop-report")
def loop_report(
    log: Annotated[Path, typer.Argument(help="A loop's metrics.jsonl.")],
    plot: Annotated[Path | None, typer.Option(help="Write accuracy/latency over time (PNG) here.")] = None,
    json_out: JsonOut = None,
) -> None:
    """Summarize a loop run: frames, rounds, swaps, rollbacks, accuracy per segment, latency while adapting."""
    from gprebn_edge.device.report import format_summary, plot_loop, read_log, summarize, summary_to_json

    check_outputs(plot, json_out)
    replaced = existing(json_out, plot)
    parsed = read_log(log)
    summary = summarize(parsed)
    if not json_to_stdout(json_out):
        console.print(format_summary(summary), soft_wrap=True)
    emit_json(json_out, summary_to_json(summary))
    if plot is not None:
        plot_loop(parsed, plot)
        note(f"plot: {plot}", json_out)
    say_replaced(replaced)
