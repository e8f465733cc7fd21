"""The public Python API (docs/api.md): exactly the names `__all__` lists, no torch on import, the result
records equal to what the commands' --json writes, and AdaptiveLoop fed frame by frame: it serves without
waiting for rounds, swaps in gated models, says what the last round decided, resumes, and refuses a frame of
the wrong shape or dtype in one line while it goes on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from deadline import call_with_deadline
from typer.testing import CliRunner

import gprebn_edge
from gprebn_edge.cli import app
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import open_source
from gprebn_edge.device.report import read_log, summarize
from gprebn_edge.device.state import StateDir

PUBLIC = {"__version__", "adapt", "export_onnx", "open_runner", "compare", "AdaptiveLoop", "AdaptReport",
          "ExportReport", "Predictions", "LoopStatus", "LoopResult", "CompareResult", "GprebnError"}


def test_all_is_exactly_the_public_api_and_importing_it_needs_no_torch():
    assert set(gprebn_edge.__all__) == PUBLIC and len(gprebn_edge.__all__) == len(PUBLIC)
    for name in PUBLIC:
        assert getattr(gprebn_edge, name) is not None
    with pytest.raises(AttributeError):
        gprebn_edge.nope  # noqa: B018
    code = ("import sys, gprebn_edge; gprebn_edge.AdaptiveLoop; gprebn_edge.open_runner; gprebn_edge.compare; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime', 'cv2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    report = gprebn_edge.adapt("builtin:small_resnet", "synthetic:clean:n=64", root / "a.safetensors", batch_size=32)
    exported = gprebn_edge.export_onnx(root / "a.safetensors", check_images=32)
    unadapted = gprebn_edge.export_onnx(root / "a.safetensors", root / "u.onnx", unadapted=True, check_images=32)
    return {"checkpoint": root / "a.safetensors", "onnx": exported.onnx, "unadapted": unadapted.onnx, "root": root,
            "report": report, "export": exported}  # type: ignore[dict-item]


def test_adapt_and_export_return_what_their_json_writes(made, tmp_path):
    report, exported = made["report"], made["export"]
    assert report.output == made["checkpoint"] and report.summary["health"]["verdict"]
    r = CliRunner().invoke(app, ["adapt", "--model", "builtin:small_resnet", "--data", "synthetic:clean:n=64",
                                 "--batch-size", "32", "-o", str(tmp_path / "c.safetensors"), "--json", "-"])
    cli = json.loads(r.stdout)
    assert set(cli) == set(report.to_dict()) and cli["health"]["verdict"] == report.to_dict()["health"]["verdict"]
    assert exported.onnx == made["checkpoint"].with_suffix(".onnx") and exported.onnx.is_file()
    r = CliRunner().invoke(app, ["export", str(made["checkpoint"]), "--onnx", str(tmp_path / "e.onnx"),
                                 "--check-images", "32", "--json", "-"])
    assert set(json.loads(r.stdout)) == set(exported.to_dict())
    assert exported.to_dict()["onnx_sha256"] == json.loads(r.stdout)["onnx_sha256"]  # same model, same bytes


def test_open_runner_and_compare(made):
    with gprebn_edge.open_runner(made["onnx"]) as runner:
        logits = runner.infer(np.zeros((2, 3, 32, 32), np.float32))
    assert logits.shape == (2, 10)
    result = gprebn_edge.compare(made["unadapted"], made["onnx"], "synthetic:fog:5:n=64", latency_iters=0)
    r = CliRunner().invoke(app, ["compare", str(made["unadapted"]), str(made["onnx"]), "--data",
                                 "synthetic:fog:5:n=64", "--latency-iters", "0", "--json", "-"])
    cli = json.loads(r.stdout)
    assert set(cli) == set(result.to_dict())
    assert cli["models"][1]["accuracy"] == result.to_dict()["models"][1]["accuracy"]


def _stream(n_clean: int, n_noise: int) -> tuple[np.ndarray, np.ndarray]:
    pre = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    batches = list(open_source(f"stream:clean*{n_clean},gaussian_noise-5*{n_noise}", pre).batches(50))
    return np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches])


def test_adaptive_loop_serves_adapts_swaps_and_resumes(made, tmp_path):
    meta_pre = json.loads(made["onnx"].with_name(made["onnx"].stem + ".manifest.json").read_text())["preprocess"]
    assert meta_pre["mean"] == [0.5, 0.5, 0.5]  # the stream above is preprocessed as the model records
    frames, labels = _stream(60, 340)
    busy_served = 0

    def run() -> tuple[object, object]:
        nonlocal busy_served
        with gprebn_edge.AdaptiveLoop(tmp_path / "st", model=made["checkpoint"], every=60, buffer=96,
                                      min_frames=48, window=50) as loop:
            # the application's own pace (~300 frames/s); after the clip it goes on with its noisy frames
            # until a round's model was swapped in (bounded)
            for i in range(4000):
                k = i if i < len(frames) else 60 + i % (len(frames) - 60)
                busy = loop.status().adapting
                out = loop.infer(frames[k], labels=[int(labels[k])])
                busy_served += busy
                assert out.logits.shape == (1, 10) and out.classes.shape == (1,) and out.round >= 0
                time.sleep(0.003)
                if i >= len(frames) and loop.status().swaps >= 1:
                    break
            return loop.status(), loop.close()

    status, result = call_with_deadline(run, 120, "the AdaptiveLoop")
    assert status.swaps >= 1 and status.rounds >= 1 and result.frames == status.frames
    assert status.serving_round >= 1 and status.passed >= 1
    assert busy_served > 0  # frames were answered while a round ran: infer never waited for it
    assert status.last_round is not None and status.last_round["outcome"] in ("passed", "rejected")
    assert isinstance(status.last_round["reasons"], list)
    summary = summarize(read_log(result.log))
    assert summary["served_only_passed"] and summary["rounds"] == result.rounds
    assert summary["labeled"] == result.frames and result.stop_reason == "closed"
    persisted = StateDir(tmp_path / "st").read()  # a round that passed after the last swap serves on resume
    assert persisted is not None and persisted.round >= result.served_round
    with gprebn_edge.AdaptiveLoop(tmp_path / "st", model=made["checkpoint"], every=60, buffer=96,
                                  min_frames=48) as again:
        assert again.status().frames == result.frames and again.status().serving_round == persisted.round
        again.infer(frames[:3])
        assert again.status().frames == result.frames + 3


def test_a_wrong_frame_is_one_line_and_the_loop_goes_on(made, tmp_path):
    with gprebn_edge.AdaptiveLoop(tmp_path / "st", onnx=made["onnx"]) as loop:
        assert loop.input[1][1:] == (3, 32, 32) and loop.input[2] == "float32"
        for bad in (np.zeros((1, 3, 32, 32), np.float64), np.zeros((1, 32, 32, 3), np.float32),
                    np.zeros((0, 3, 32, 32), np.float32), [[0.0]]):
            with pytest.raises(gprebn_edge.GprebnError) as e:
                loop.infer(bad)  # type: ignore[arg-type]
            message = str(e.value)
            assert "\n" not in message and "float32 frames of shape (N, 3, 32, 32)" in message and "'input'" in message
        out = loop.infer(np.zeros((4, 3, 32, 32), np.float32))
        assert out.logits.shape == (4, 10) and loop.status().frames == 4
        rgb = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)  # fitted to 32x32
        assert loop.infer(loop.prepare(rgb)).classes.shape == (2,)
        with pytest.raises(gprebn_edge.GprebnError, match="uint8 RGB"):
            loop.prepare(np.zeros((32, 32), np.uint8))
    assert not (tmp_path / "st" / "round-000001.onnx").exists()  # serve-only: nothing adapted


def test_the_api_names_survive_the_modules_being_imported():
    """A submodule named like a public function would replace it on the package once imported
    (`import gprebn_edge.adapt` made `gprebn_edge.adapt` the module): the adapt stage is `adaptation`."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(gprebn_edge.__path__):
        importlib.import_module(f"gprebn_edge.{info.name}")
    for name in gprebn_edge.__all__:
        assert not isinstance(getattr(gprebn_edge, name), types.ModuleType), name
