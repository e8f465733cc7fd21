"""The device loop's frame sources: every kind (image folder, .npy/.npz, synthetic, the built-in shifting
stream, a video file, a camera) seen through one small protocol, one frame at a time, in order, each with
its label and segment where the source has them, and a name (the file name, or the frame's number)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gprebn_edge.data.folder import FolderSource
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.source_base import ImageSource
from gprebn_edge.data.sources import open_source
from gprebn_edge.data.stream import ShiftingStream, StreamBatch
from gprebn_edge.data.video import VideoFrames, is_video_spec

__all__ = ["Frame", "FrameSource", "open_frames"]


@dataclass(frozen=True)
class Frame:
    images: np.ndarray     # float32 (1, C, H, W), preprocessed: what the model takes
    label: int | None
    segment: str | None    # "fog-5#1": the shifting stream's segment (name#position), else None
    name: str              # the image's file name in a folder, else the frame's number in the source


class FrameSource(Protocol):
    """What the loop reads frames from."""

    def frames(self) -> Iterator[Frame]: ...

    @property
    def skipped(self) -> int:
        """Unreadable frames skipped so far (image folders)."""
        ...


class _ImageFrames:
    """An image source (or a video: the same `batches`), one frame at a time."""

    def __init__(self, source: ImageSource | VideoFrames) -> None:
        self.source = source
        self.segment_names = ([f"{s.name}#{k}" for k, s in enumerate(source.segments())]
                              if isinstance(source, ShiftingStream) else None)

    @property
    def skipped(self) -> int:
        return len(self.source.skipped) if isinstance(self.source, ImageSource) else 0

    def frames(self) -> Iterator[Frame]:
        folder = self.source if isinstance(self.source, FolderSource) else None
        files = [folder.files[i] for i in folder.order] if folder is not None else []
        at = 0  # the next file in a folder's order: skipped (unreadable) files are passed over
        for number, batch in enumerate(self.source.batches(1)):
            if folder is not None:
                bad = {rel for rel, _ in folder.skipped}
                while files[at] in bad:
                    at += 1
                name, at = files[at], at + 1
            else:
                name = str(number)
            segment = (self.segment_names[int(batch.segment[0])]
                       if self.segment_names is not None and isinstance(batch, StreamBatch) else None)
            yield Frame(batch.images, None if batch.labels is None else int(batch.labels[0]), segment, name)


def open_frames(spec: str, preprocess: Preprocess, input_shape: tuple[object, ...] | None) -> FrameSource:
    """The frame source `spec`, in order. A video file or camera (OpenCV) is sized to the model's input
    (`input_shape`, NCHW) where the preprocessing sets no size."""
    if is_video_spec(spec):
        size = None
        if input_shape is not None and len(input_shape) == 4:
            h, w = input_shape[2], input_shape[3]
            if isinstance(h, int) and isinstance(w, int):
                size = (h, w)
        return _ImageFrames(VideoFrames(spec, preprocess, size=size))
    return _ImageFrames(open_source(spec, preprocess, shuffle=False))
