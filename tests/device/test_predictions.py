"""`loop --predictions PATH|-`: one JSON line per served frame (frame, source name, class, confidence, the
round that served it), flushed as served; its accuracy equals loop-report's for the same frames; a folder's
frames are named by file (unreadable ones skipped); stdout carries only the lines; a file rotates like the
metrics log and a resumed run appends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file
from gprebn_edge.cli import app
from gprebn_edge.device.loop import PredictionsOut
from gprebn_edge.device.metrics_log import log_parts, read_log

STREAM = "stream:clean*60,gaussian_noise-5*240"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    from gprebn_edge.export.pipeline import export_artifact

    root = tmp_path_factory.mktemp("predictions")
    adapt_to_file("builtin:small_resnet", "synthetic:clean:n=64", root / "s.safetensors", AdaptConfig(batch_size=32))
    export_artifact(root / "s.safetensors", root / "s.onnx", check_images=16)
    return {"start": root / "s.safetensors", "onnx": root / "s.onnx"}


def _lines(path: Path) -> list[dict]:
    return [r for r in read_log(path).records if r["event"] == "prediction"]


def test_predictions_accuracy_equals_loop_report(made, tmp_path):
    state, out = tmp_path / "st", tmp_path / "pred.jsonl"
    r = CliRunner().invoke(app, ["loop", "--model", str(made["start"]), "--source", STREAM, "--state", str(state),
                                 "--every", "60", "--buffer", "128", "--fps", "300", "--predictions", str(out)])
    assert r.exit_code == 0, r.output
    lines = _lines(out)
    assert [p["frame"] for p in lines] == list(range(300)) and [p["source"] for p in lines[:3]] == ["0", "1", "2"]
    assert all(0 <= p["class"] < 10 and 0 < p["confidence"] <= 1 for p in lines)
    report = json.loads(CliRunner().invoke(app, ["loop-report", str(state / "metrics.jsonl"), "--json", "-"]).stdout)
    correct = sum(p["class"] == p["label"] for p in lines)
    assert report["labeled"] == len(lines) == 300 and report["correct"] == correct
    assert report["accuracy"] == correct / len(lines)
    # the round that served each frame: the log's swaps say from which frame on each round served
    swaps = [rec for rec in read_log(state / "metrics.jsonl").records if rec["event"] == "swap"]
    expected = np.zeros(300, int)
    for s in swaps:
        expected[s["frames"]:] = s["round"]
    assert [p["round"] for p in lines] == expected.tolist()
    print(f"predictions: {len(lines)} frames, accuracy {correct / len(lines):.4f}; loop-report "
          f"{report['accuracy']:.4f}; rounds served {sorted(set(expected.tolist()))}")


def test_a_folder_names_its_frames_and_stdout_carries_only_the_lines(made, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(12):
        Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(frames / f"{i:03d}.png")
    (frames / "005.png").write_bytes(b"not an image")  # skipped, so frame 5 is 006.png
    r = CliRunner().invoke(app, ["loop", "--onnx", str(made["onnx"]), "--source", str(frames), "--state",
                                 str(tmp_path / "st"), "--predictions", "-"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [p["source"] for p in lines] == [f"{i:03d}.png" for i in range(12) if i != 5]
    assert [p["frame"] for p in lines] == list(range(11)) and "label" not in lines[0]
    assert "11 frames (source exhausted, 1 unreadable skipped)" in r.stderr


def test_a_predictions_file_rotates_and_a_resume_appends(made, tmp_path):
    out = tmp_path / "p.jsonl"
    writer = PredictionsOut(str(out), max_bytes=2000)
    for i in range(60):
        writer.write(i, str(i), np.arange(10, dtype=np.float32), 0, None)
    writer.close()
    assert len(log_parts(out)) == 3  # the newest two parts kept, and the current file
    kept = _lines(out)
    assert [p["frame"] for p in kept] == list(range(60 - len(kept), 60))
    state = tmp_path / "st"
    args = ["loop", "--onnx", str(made["onnx"]), "--source", STREAM, "--state", str(state), "--predictions",
            str(tmp_path / "q.jsonl")]
    assert CliRunner().invoke(app, [*args, "--frames", "100"]).exit_code == 0
    assert CliRunner().invoke(app, args).exit_code == 0
    assert [p["frame"] for p in _lines(tmp_path / "q.jsonl")] == list(range(300))
    with pytest.raises(Exception, match="cannot open --predictions"):
        PredictionsOut(str(tmp_path / "no" / "such" / "p.jsonl"))
