"""`gprebn-edge loop`: the device loop over a frame source (image folder, arrays, the built-in stream, a
video or a camera), with its --predictions lines. The loop itself (serving, rounds, gates, swaps, state,
publishing, stopping) is `LoopSession` (session.py), which `AdaptiveLoop` runs on the application's frames."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.device.config import LoopConfig, LoopResult
from gprebn_edge.device.frames import FrameSource
from gprebn_edge.device.metrics_log import MAX_BYTES, MetricsLog
from gprebn_edge.device.session import LoopSession
from gprebn_edge.device.stop import INTERRUPTED, StopToken
from gprebn_edge.device.window import frame_predictions
from gprebn_edge.errors import InputError
from gprebn_edge.io import strict_json

__all__ = ["LoopConfig", "LoopResult", "PredictionsOut", "run_loop"]


class PredictionsOut:
    """--predictions: one JSON line per served frame, flushed as served; a file rotates like the metrics log."""

    def __init__(self, target: str, on_error: Callable[[OSError], None] | None = None,
                 max_bytes: int = MAX_BYTES) -> None:
        try:
            self.log = (None if target == "-" else
                        MetricsLog(Path(target), on_error=on_error, fsync=False, max_bytes=max_bytes))
        except OSError as e:
            raise InputError(f"cannot open --predictions {target} ({e.strerror or e}): give a file in an existing "
                             "folder, or - for stdout") from None

    def write(self, frame: int, name: str, logits: np.ndarray, served_round: int, label: int | None) -> None:
        cls, conf = frame_predictions(logits[None])
        fields: dict[str, Any] = {"frame": frame, "source": name, "class": int(cls[0]),
                                  "confidence": float(conf[0]), "round": served_round}
        if label is not None:
            fields["label"] = label
        if self.log is not None:
            self.log.write("prediction", **fields)
        else:
            sys.stdout.write(strict_json({"event": "prediction", "t": round(time.time(), 3), **fields}) + "\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def run_loop(config: LoopConfig, on_window: Callable[[dict[str, Any]], None] | None = None,
             on_notice: Callable[[str], None] | None = None, stop: StopToken | None = None) -> LoopResult:
    """`gprebn-edge loop`: serve the frames of `config.source` until it ends, `max_frames` frames were served,
    or a stop request (`stop`, which a CLI's signal handler sets; or Ctrl-C). `on_window` gets each window's
    metrics record; `on_notice` each problem serving survives (a worker failure, a full disk, a failed
    publish), as one line, when it happens. Worker failures are also in `LoopResult.errors`. A start that
    fails leaves no state folder behind; so does one stopped before its first frame (KeyboardInterrupt). A
    stop while serving returns with stop_reason "interrupted"; a KeyboardInterrupt raised into the loop is
    handled the same way, then raised again."""
    session = LoopSession(config, on_window, on_notice, stop)
    session.start()
    predictions: PredictionsOut | None = None
    try:
        source = session.open_frames(config.source)
        if config.predictions:
            predictions = PredictionsOut(config.predictions, lambda e: session.report(
                f"cannot write --predictions {config.predictions} ({e.strerror or e}): serving goes on"))
        finished = _serve_source(session, source, predictions)
    except BaseException:
        try:
            session.close(finish=False, failed=True)
        finally:
            if predictions is not None:
                predictions.close()
        raise
    try:
        result = session.close(finish=finished)
    finally:
        if predictions is not None:
            predictions.close()
    if session.undone:
        raise KeyboardInterrupt
    return result


def _serve_source(session: LoopSession, source: FrameSource, predictions: PredictionsOut | None) -> bool:
    """Serve `source` frame by frame; True when it ended by itself (the round in flight may then finish)."""
    c = session.config
    live = c.source.startswith("camera:")  # a camera has no past frames to skip on resume
    skip = session.frames if session.resumed and not live else 0
    next_frame_time = time.perf_counter()
    for frame in source.frames():
        if session.stop.is_set():  # Ctrl-C/SIGTERM: acted on here, between two frames, never inside native code
            session.reason = INTERRUPTED
            return False
        if skip:
            skip -= 1
            continue
        if c.fps is not None:  # a camera delivers frames at its own rate
            next_frame_time += 1.0 / c.fps
            time.sleep(max(0.0, next_frame_time - time.perf_counter()))
        if c.max_frames is not None and session.frames >= c.max_frames:
            session.reason = "frame limit reached"
            return False
        session.skipped = source.skipped
        logits = session.serve(frame.images, [frame.label], [frame.segment])
        if predictions is not None:
            predictions.write(session.frames - 1, frame.name, logits[0], session.served_round, frame.label)
    session.skipped = source.skipped
    session.reason = "source exhausted"
    return True
