"""Issue 21's bug: a loop whose frame source is gone (a resumed run after its frames folder or video was
deleted, or a first run with --engine alone) must say so in one line, not end in an internal error
(`'_Loop' object has no attribute 'source'`). Each way in runs the command as a user would."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file
from gprebn_edge.cli import app


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from gprebn_edge.export.pipeline import export_artifact

    folder = tmp_path_factory.mktemp("missing")
    adapt_to_file("builtin:small_resnet", "synthetic:clean:n=64", folder / "start.safetensors",
                  AdaptConfig(batch_size=32))
    export_artifact(folder / "start.safetensors", folder / "m.onnx", check_images=16)
    return folder / "m.onnx"


def _invoke(*args: object):
    return CliRunner().invoke(app, ["loop", *map(str, args)])


def _one_error_line(r, *words: str) -> None:
    assert r.exit_code == 1, r.output
    assert "internal error" not in r.output and "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.output
    for w in words:
        assert w in lines[0], r.output


def test_resume_with_the_frames_folder_gone_is_one_line(tmp_path, exported):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(12):
        Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(frames / f"{i:03d}.png")
    state = tmp_path / "st"
    first = _invoke("--onnx", exported, "--source", frames, "--state", state)
    assert first.exit_code == 0, first.output
    shutil.rmtree(frames)
    _one_error_line(_invoke("--onnx", exported, "--source", frames, "--state", state), str(frames))
    assert (state / "state.json").is_file()  # the state folder is left as it was: servable


def test_resume_with_the_video_gone_is_one_line(tmp_path, exported):
    cv2 = pytest.importorskip("cv2")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for i in range(10):
        writer.write(np.full((32, 32, 3), 20 * i, np.uint8))
    writer.release()
    state = tmp_path / "st"
    first = _invoke("--onnx", exported, "--source", f"video:{video}", "--state", state)
    assert first.exit_code == 0, first.output
    video.unlink()
    _one_error_line(_invoke("--onnx", exported, "--source", f"video:{video}", "--state", state), str(video))


def test_engine_alone_with_a_missing_source_is_one_line(tmp_path, exported, monkeypatch):
    """--engine alone: no input check opens the source. TensorRT cannot run here: the 'engine' is the ONNX
    file, opened by onnxruntime in its place (as in test_loop_defects)."""
    from gprebn_edge.runtime import loading

    engine = tmp_path / "m.engine"
    shutil.copyfile(exported, engine)
    shutil.copyfile(exported.with_name("m.manifest.json"), tmp_path / "m.manifest.json")
    real_open = loading.open_runner

    def open_as_onnx(path, backend="auto", **kw):
        kw.pop("device", None)
        return real_open(path, "onnxruntime", **{k: v for k, v in kw.items() if k in ("threads", "shared_cpu")},
                         verify=False)

    import gprebn_edge.device.session as loop_module

    monkeypatch.setattr(loop_module, "open_runner", open_as_onnx)
    missing = tmp_path / "no-such-frames"
    r = _invoke("--engine", engine, "--no-verify", "--source", missing, "--state", tmp_path / "st")
    _one_error_line(r, str(missing))
    assert not (tmp_path / "st").exists()  # a failed start leaves nothing


def test_every_attribute_of_the_loop_exists_after_init(tmp_path, exported):
    """The bug's cause, checked for all of them: an attribute first set outside __init__ is missing on an
    early way out. Every `self.NAME =` in LoopSession is already there once it is made."""
    import ast
    import inspect

    from gprebn_edge.device.config import LoopConfig
    from gprebn_edge.device.session import LoopSession

    tree = ast.parse(inspect.getsource(LoopSession))
    assigned = {t.attr for node in ast.walk(tree) if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign)
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                for t in ast.walk(t) if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                and t.value.id == "self"}
    session = LoopSession(LoopConfig(state=tmp_path / "st", source="stream", onnx=exported))
    assert len(assigned) > 20 and assigned <= set(vars(session)), assigned - set(vars(session))
