"""Video files and cameras as frame sources (OpenCV, the `video` extra; skipped where it is missing)."""

import sys

import numpy as np
import pytest

from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.video import VideoFrames, is_video_spec
from gprebn_edge.errors import InputError, MissingDependencyError


def _write_video(path, frames=12, size=(64, 48)):
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()
    return path


def test_is_video_spec():
    assert is_video_spec("video:x") and is_video_spec("camera:0") and is_video_spec("clip.MP4")
    assert not is_video_spec("synthetic:fog:5") and not is_video_spec("images/")


def test_frames_are_read_in_order_and_sized_for_the_model(tmp_path):
    path = _write_video(tmp_path / "clip.avi")
    frames = VideoFrames(f"video:{path}", Preprocess(), size=(32, 32))
    batches = list(frames.batches(1))
    assert len(batches) == 12 and all(b.images.shape == (1, 3, 32, 32) and b.labels is None for b in batches)
    assert len(list(VideoFrames(str(path), Preprocess(), size=(32, 32), limit=5).batches(2))) == 3


def test_bad_video_specs(tmp_path):
    pytest.importorskip("cv2")
    with pytest.raises(InputError, match="no such file"):
        VideoFrames(f"video:{tmp_path / 'none.mp4'}", Preprocess())
    with pytest.raises(InputError, match="camera:N"):
        VideoFrames("camera:front", Preprocess())
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(InputError, match="cannot open"):
        VideoFrames(str(tmp_path / "bad.mp4"), Preprocess())


def test_missing_opencv_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[video\]"):
        VideoFrames(str(tmp_path / "clip.mp4"), Preprocess())
