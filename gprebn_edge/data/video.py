"""Frames from a video file or a camera, for the device loop: `video:PATH` (or a path ending in a video
suffix) and `camera:N`. Read in order with OpenCV (the `video` extra, imported on first use); no labels.
numpy only otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.source_base import Batch
from gprebn_edge.errors import InputError, MissingDependencyError
from gprebn_edge.validate import flag_number

__all__ = ["VIDEO_SUFFIXES", "VideoFrames", "is_video_spec"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")


def is_video_spec(spec: str) -> bool:
    return spec.startswith(("video:", "camera:")) or Path(spec).suffix.lower() in VIDEO_SUFFIXES


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise MissingDependencyError("reading video or a camera needs OpenCV: "
                                     "pip install 'gprebn-edge[video]'") from None
    return cv2


class VideoFrames:
    """The frames of `spec` in order, preprocessed. `size` (H, W) is the model's input size, used where the
    preprocessing sets no crop (a camera's 640x480 frame is resized on its shorter side and center-cropped);
    `limit` stops after that many frames. A camera never ends by itself."""

    kind = "video"
    has_labels = False

    def __init__(self, spec: str, preprocess: Preprocess, *, size: tuple[int, int] | None = None,
                 limit: int | None = None) -> None:
        self.spec = spec
        self.preprocess = preprocess
        self.size = size
        self.limit = limit
        if spec.startswith("camera:"):
            index = spec.split(":", 1)[1]
            if not index.isdecimal():
                raise InputError(f"bad camera {spec!r}: use camera:N with N the camera index, e.g. camera:0")
            self.target: str | int = int(index)
        else:
            path = Path(spec.split(":", 1)[1] if spec.startswith("video:") else spec).expanduser()
            if not path.is_file():
                raise InputError(f"cannot read video {path}: no such file")
            self.target = str(path)
        self._check_open()

    def _open(self) -> Any:
        cv2 = _cv2()
        capture = cv2.VideoCapture(self.target)
        if not capture.isOpened():
            what = f"camera {self.target}" if isinstance(self.target, int) else f"video {self.target}"
            raise InputError(f"OpenCV cannot open {what}: check the path or index and the codec")
        return capture

    def _check_open(self) -> None:
        self._open().release()

    def _geometry(self, rgb: np.ndarray) -> np.ndarray:
        p = self.preprocess
        if (p.resize is not None or p.crop is not None) or self.size is None:
            return p.geometry(Image.fromarray(rgb))
        h, w = self.size
        image = Image.fromarray(rgb)
        scale = max(h / image.height, w / image.width)
        image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
        left, top = (image.width - w) // 2, (image.height - h) // 2
        return np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.uint8)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        flag_number(batch_size, "batch size", low=1)
        cv2 = _cv2()
        capture = self._open()
        served, pending = 0, []
        try:
            while self.limit is None or served < self.limit:
                ok, frame = capture.read()
                if not ok:
                    break
                pending.append(self._geometry(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
                served += 1
                if len(pending) == batch_size:
                    raw = np.stack(pending)
                    pending = []
                    yield Batch(self.preprocess.normalize(raw), None, raw)
            if pending:
                raw = np.stack(pending)
                yield Batch(self.preprocess.normalize(raw), None, raw)
        finally:
            capture.release()
