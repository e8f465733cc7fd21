"""`loop` and `loop-report`: the device loop's commands."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from gprebn_edge.cli._app import command, console, err_console, error_line, session, status
from gprebn_edge.cli.options import JsonOut, TrustModelCode, Verify
from gprebn_edge.cli.output import check_outputs, emit_json, existing, json_to_stdout, note, say_replaced
from gprebn_edge.errors import GprebnError


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
    shift_trigger: Annotated[bool, typer.Option(help="Also start a round early when the inputs or the serving "
                                                "model's outputs shift (the log says why each round started).")] = True,
    trust_model_code: TrustModelCode = False,
    verify: Verify = True,
) -> None:
    """Serve frames with the current model while re-adapting it in the background; swap in a candidate only
    after it passed its gates; persist and resume."""
    stopped = f"the state in {state} is servable; run the same command again to resume"
    session.interrupted = f"interrupted: {stopped}"  # the line @command's error mapping prints on a stop
    from gprebn_edge.consent import CodeConsent
    from gprebn_edge.device.loop import LoopConfig
    from gprebn_edge.device.shift import ShiftConfig

    with _stop_signals() as stop:
        try:
            _run(LoopConfig(state=state, source=source, model=model, onnx=onnx, engine=engine,
                            every=every if every is not None or interval is not None else 500, interval=interval,
                            buffer=buffer, holdout=holdout, probe=probe, recovery=recovery, max_frames=frames,
                            fps=fps, window=window, lr=lr, adapt_threads=adapt_threads, serve_threads=serve_threads,
                            consent=CodeConsent(any_code=trust_model_code), verify=verify,
                            shift=ShiftConfig() if shift_trigger else None), stop)
        except (KeyboardInterrupt, GprebnError):
            # after a stop signal, an error on the way out is its consequence: the signal is reported
            if stop.signum is None:
                raise
            if stop.signum == signal.SIGTERM:  # Ctrl-C goes on to the error mapping: exit 130
                err_console.print(f"terminated: {stopped}", soft_wrap=True)
                raise typer.Exit(128 + signal.SIGTERM) from None
            raise KeyboardInterrupt from None


def _run(config: Any, stop: _Stop) -> None:
    from gprebn_edge.device.loop import run_loop

    with status() as say:
        def on_window(r: dict[str, Any]) -> None:
            acc = "" if not r["labeled"] else f", accuracy {100 * r['correct'] / r['labeled']:.1f} %"
            say(f"{r['frames']} frames, serving round {r['served_round']}, p50 {r['latency_ms']['p50']:.2f} ms"
                f"{acc}, entropy {r['mean_entropy']:.3f}")

        def on_notice(message: str) -> None:
            err_console.print(error_line("error:", message), soft_wrap=True)

        result = run_loop(config, on_window=on_window, on_notice=on_notice, should_stop=stop.requested)
    skipped = f", {result.skipped} unreadable skipped" if result.skipped else ""
    console.print(f"{'resumed, ' if result.resumed else ''}{result.frames} frames ({result.stop_reason}{skipped}); "
                  f"rounds {result.rounds}, passed {result.passed}, swaps {result.swaps}, rollbacks "
                  f"{result.rollbacks}; serving round {result.served_round}; {result.seconds:.1f} s",
                  soft_wrap=True)
    console.print(f"log: {result.log}  (gprebn-edge loop-report {result.log})", soft_wrap=True)
    if result.worker_abandoned:
        # the worker is still inside torch: a normal interpreter exit would abort in its native thread pool
        # ("terminate called without an active exception"); everything on disk is closed, so leave at once
        err_console.print(error_line("error:", "the adaptation worker did not stop in time; exiting without "
                                     "waiting for it (the state folder is servable)"), soft_wrap=True)
        _exit_now(128 + stop.signum if stop.signum is not None else 1)
    if stop.signum is not None:  # the loop stopped as asked: one line and 130/143, from the caller
        raise KeyboardInterrupt
    if result.errors:  # each was reported when it happened; serving went on, but the command failed
        more = f" (and {len(result.errors) - 1} more, in the log)" if len(result.errors) > 1 else ""
        err_console.print(error_line("error:", f"{result.errors[0]}{more}"), soft_wrap=True)
        raise typer.Exit(1)


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Stop:
    """The signal the loop was asked to stop with. The handler only records it; the loop acts on it at its
    next safe point (between two frames, between two start-up steps), never inside native code: an exception
    raised into torch's or onnxruntime's callbacks, or into an import another thread waits on, can abort the
    process or leave a module half-imported."""

    signum: int | None = None

    def requested(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def _stop_signals() -> Iterator[_Stop]:
    """Ctrl-C and SIGTERM stop the loop the same way: the first is recorded for the loop to act on (it stops the
    worker and closes the runners before returning, so no native thread is left running at exit); later ones
    are ignored while it stops. The old handlers come back afterwards."""
    stop = _Stop()

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is None:
            stop.signum = signum

    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield stop
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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
