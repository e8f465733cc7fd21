"""examples/app_video.py, run as a user would: a short video made from the built-in shifting stream,
classified frame by frame through AdaptiveLoop, with an overlay video written. Skipped without OpenCV
(the `video` extra; `make test` installs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

cv2 = pytest.importorskip("cv2")

APP = Path(__file__).resolve().parents[1] / "examples" / "app_video.py"


@pytest.fixture(scope="module")
def onnx(tmp_path_factory) -> Path:
    from gprebn_edge.adaptation import AdaptConfig, adapt_to_file
    from gprebn_edge.export.pipeline import export_artifact

    root = tmp_path_factory.mktemp("app")
    adapt_to_file("builtin:small_resnet", "synthetic:clean:n=64", root / "a.safetensors", AdaptConfig(batch_size=32))
    return Path(export_artifact(root / "a.safetensors", root / "a.onnx", check_images=16)["onnx"])


def _app(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(APP), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_the_example_app_classifies_a_generated_video(onnx, tmp_path):
    video, overlay = tmp_path / "stream.avi", tmp_path / "out.avi"
    made = _app("--write-stream-video", video, "--stream", "stream:clean*60,gaussian_noise-5*120")
    assert made.returncode == 0 and "wrote 180 frames" in made.stdout, made.stderr
    run = _app(video, "--onnx", onnx, "--state", tmp_path / "st", "--overlay", overlay, "--print-every", "60",
               "--fps", "0")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[:3]] == ["frame 0", "frame 60", "frame 120"]
    assert lines[3].startswith("180 frames, infer p50") and "serving round 0" in lines[3]
    capture = cv2.VideoCapture(str(overlay))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 180
    capture.release()
    bad = _app(tmp_path / "missing.avi", "--onnx", onnx, "--state", tmp_path / "st2")
    missing = f"error: OpenCV cannot open {tmp_path}/missing.avi"
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [missing]
