"""An application that owns its camera: read a video file (or a camera) with OpenCV, classify every frame
with `gprebn_edge.AdaptiveLoop`, which keeps re-adapting the model in the background, and print (or
overlay) the predictions. Needs OpenCV: pip install 'gprebn-edge[video]'.

    # a video made from the built-in shifting stream (default: 150 clean, 450 gaussian noise, 450 fog frames)
    python examples/app_video.py --write-stream-video stream.avi
    # classify it while adapting (a checkpoint to adapt needs PyTorch; --onnx alone only serves)
    python examples/app_video.py stream.avi --model adapted.safetensors --state st --every 150 --overlay out.avi
    python examples/app_video.py camera:0 --onnx adapted.onnx --state st

One line per `--print-every` frames, one per model swap, and a summary; the loop's metrics log is in the
state folder (`gprebn-edge loop-report st/metrics.jsonl`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import gprebn_edge


def write_stream_video(path: Path, spec: str, fps: float = 30.0) -> int:
    """The built-in shifting stream's frames (uint8 RGB, before normalization) as an MJPG video."""
    import cv2

    from gprebn_edge.data.preprocess import Preprocess
    from gprebn_edge.data.sources import open_source

    writer = None
    n = 0
    for batch in open_source(spec, Preprocess()).batches(100):
        for rgb in batch.raw:
            if writer is None:
                h, w = rgb.shape[:2]
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
            writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            n += 1
    if writer is not None:
        writer.release()
    return n


def open_capture(source: str):  # noqa: ANN201 - cv2.VideoCapture
    import cv2

    target: str | int = int(source.split(":", 1)[1]) if source.startswith("camera:") else source
    capture = cv2.VideoCapture(target)
    if not capture.isOpened():
        sys.exit(f"error: OpenCV cannot open {source}")
    return capture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="a video file, or camera:N")
    parser.add_argument("--state", type=Path, default=Path("app-state"), help="the loop's state folder")
    parser.add_argument("--model", help="an adapted checkpoint to keep adapting")
    parser.add_argument("--onnx", help="an ONNX export to serve (without --model: no adaptation)")
    parser.add_argument("--every", type=int, help="frames between adaptation rounds")
    parser.add_argument("--publish", help="DIR[:NAME]: publish every gated model for Triton/DeepStream")
    parser.add_argument("--overlay", type=Path, help="write the frames with their predictions here (MJPG)")
    parser.add_argument("--print-every", type=int, default=100, help="print one frame's prediction every N frames")
    parser.add_argument("--frames", type=int, help="stop after this many frames")
    parser.add_argument("--fps", type=float, help="play a video file at this rate (default: its own; 0: as fast "
                        "as it classifies); a camera runs at its own")
    parser.add_argument("--write-stream-video", type=Path, help="only write a video of the built-in stream here")
    parser.add_argument("--stream", default="stream:clean*150,gaussian_noise-5*450,fog-5*450")
    args = parser.parse_args(argv)
    try:
        import cv2
    except ImportError:
        sys.exit("error: this example needs OpenCV: pip install 'gprebn-edge[video]'")
    if args.write_stream_video:
        n = write_stream_video(args.write_stream_video, args.stream)
        print(f"wrote {n} frames of {args.stream} to {args.write_stream_video}")
        return 0
    if not args.source or not (args.model or args.onnx):
        parser.error("give a SOURCE and --model and/or --onnx")

    capture = open_capture(args.source)
    fps = args.fps if args.fps is not None else 0.0 if args.source.startswith("camera:") else capture.get(
        cv2.CAP_PROP_FPS)
    next_frame = time.perf_counter()
    overlay = None
    served, latencies, classes = 0, [], np.zeros(0, int)
    last_round = None
    try:
        with gprebn_edge.AdaptiveLoop(args.state, model=args.model, onnx=args.onnx, every=args.every,
                                      publish=args.publish) as loop:
            while args.frames is None or served < args.frames:
                ok, bgr = capture.read()
                if not ok:
                    break
                if fps > 0:  # a file played like a camera: the loop adapts while frames come in
                    next_frame += 1.0 / fps
                    time.sleep(max(0.0, next_frame - time.perf_counter()))
                t0 = time.perf_counter()
                out = loop.infer(loop.prepare(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
                latencies.append((time.perf_counter() - t0) * 1e3)
                cls, conf = int(out.classes[0]), float(out.confidence[0])
                classes = np.append(classes, cls)
                if out.round != last_round:
                    if last_round is not None:
                        decided = loop.status().last_round or {}
                        print(f"frame {served}: now serving round {out.round} (round {decided.get('round')} "
                              f"{decided.get('outcome')})")
                    last_round = out.round
                if served % args.print_every == 0:
                    print(f"frame {served}: class {cls} ({conf:.2f}), round {out.round}")
                if args.overlay is not None:
                    if overlay is None:
                        h, w = bgr.shape[:2]
                        overlay = cv2.VideoWriter(str(args.overlay), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (w, h))
                    frame = bgr.copy()
                    cv2.putText(frame, f"{cls}", (1, max(10, frame.shape[0] // 3)), cv2.FONT_HERSHEY_PLAIN,
                                max(0.6, frame.shape[0] / 64), (0, 0, 255), 1)
                    overlay.write(frame)
                served += 1
            status = loop.status()
    finally:
        capture.release()
        if overlay is not None:
            overlay.release()
    counts = np.bincount(classes[classes >= 0], minlength=10) if len(classes) else np.zeros(0, int)
    p50 = float(np.percentile(latencies, 50)) if latencies else float("nan")
    print(f"{served} frames, infer p50 {p50:.2f} ms; rounds {status.rounds} (passed {status.passed}), swaps "
          f"{status.swaps}; serving round {status.serving_round}; classes predicted {int((counts > 0).sum())}")
    if status.last_round is not None:
        reasons = "; ".join(status.last_round.get("reasons") or []) or "all gates passed"
        print(f"last round {status.last_round['round']}: {status.last_round['outcome']} ({reasons[:160]})")
    print(f"log: {loop.log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
