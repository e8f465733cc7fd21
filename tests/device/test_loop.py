"""The device loop: rounds, gates, swaps, rollback, persistence and resume, on the built-in shifting stream."""

import json
from pathlib import Path

import pytest

from gprebn_edge.device.gates import GateConfig
from gprebn_edge.device.loop import LoopConfig, run_loop
from gprebn_edge.device.report import read_log, summarize
from gprebn_edge.device.state import StateDir
from gprebn_edge.errors import InputError

STREAM = "stream:clean*200,gaussian_noise-5*500"


def _config(tmp_path, start, **kw):
    base = {"state": tmp_path / "state", "source": STREAM, "model": start, "every": 150, "buffer": 192,
            "min_frames": 96, "window": 100, "fps": 150.0}  # slow enough for rounds on a busy machine
    return LoopConfig(**{**base, **kw})


def test_loop_adapts_swaps_and_persists(tmp_path, start):
    result = run_loop(_config(tmp_path, start))
    assert result.frames == 700 and result.stop_reason == "source exhausted" and not result.resumed
    assert result.rounds >= 2 and result.passed >= 1 and result.swaps >= 1
    summary = summarize(read_log(result.log))
    assert summary["served_only_passed"] and summary["frames"] == 700 and summary["swaps"] == result.swaps
    segments = {s["name"]: s for s in summary["segments"]}
    assert segments["clean#0"]["labeled"] == 200 and segments["gaussian_noise-5#1"]["labeled"] == 500
    from gprebn_edge.device.report import _segment_spans

    windows = [r for r in read_log(result.log).records if r["event"] == "window"]
    assert _segment_spans(windows) == {"clean#0": (0, 200), "gaussian_noise-5#1": (200, 700)}  # exact, not windows
    state = StateDir(tmp_path / "state").read()
    # the model serving at the end was adapted on noisy frames: on held-out noisy images it beats the start
    from gprebn_edge.export.pipeline import export_artifact
    from gprebn_edge.runtime.tasks import compare_models

    start_onnx = export_artifact(start, tmp_path / "start.onnx", check_images=64)["onnx"]
    final = compare_models(start_onnx, tmp_path / "state" / state.onnx, "synthetic:gaussian_noise:5:n=256:split=test",
                           latency_iters=0)
    assert final.b.error < final.a.error - 0.2, (final.a.error, final.b.error)
    assert state is not None and state.frames == 700 and state.round >= 1
    files = {p.name for p in (tmp_path / "state").iterdir()}
    assert {state.checkpoint, state.onnx, "state.json", "metrics.jsonl"} <= files
    stray = [f for f in files if f.startswith("round-") and not f.startswith((f"round-{state.round:06d}",
                                                                            "round-000000"))]
    assert stray == []  # only the serving round's files are kept, and the start's (what a fallback serves)
    assert {"round-000000.onnx", "round-000000.safetensors"} <= files
    assert not any(f.endswith(".tmp") for f in files)


def test_restart_resumes_where_it_stopped(tmp_path, start):
    first = run_loop(_config(tmp_path, start, max_frames=300))
    assert first.frames == 300 and first.stop_reason == "frame limit reached"
    served = StateDir(tmp_path / "state").read()
    second = run_loop(_config(tmp_path, start))
    assert second.resumed and second.frames == 700
    records = read_log(second.log).records
    starts = [r for r in records if r["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["frames"] == 300
    assert starts[1]["round"] == served.round
    assert summarize(read_log(second.log))["frames_in_windows"] == 700


def test_failing_gates_never_swap_and_roll_back(tmp_path, start):
    impossible = GateConfig(min_mean_entropy=1.0)  # no candidate can have maximal entropy
    result = run_loop(_config(tmp_path, start, gates=impossible, recovery=2, every=100))
    assert result.rounds >= 2 and result.passed == 0 and result.swaps == 0 and result.served_round == 0
    assert result.rollbacks >= 1
    records = read_log(result.log).records
    rounds = [r for r in records if r["event"] == "round"]
    assert all(not r["passed"] and any("mean_entropy" in x for x in r["reasons"]) for r in rounds)
    files = {p.name for p in (tmp_path / "state").iterdir()}
    assert not any(f.startswith("round-") and not f.startswith("round-000000") for f in files)


def test_serve_only_with_an_onnx_file(tmp_path, start):
    from gprebn_edge.export.pipeline import export_artifact

    onnx = export_artifact(start, tmp_path / "start.onnx", check_images=64)["onnx"]
    result = run_loop(_config(tmp_path, None, model=None, onnx=Path(onnx), max_frames=250))
    assert result.frames == 250 and result.rounds == 0 and result.swaps == 0
    record = [json.loads(line) for line in result.log.read_text().splitlines()][0]
    assert record["event"] == "start" and record["adapting"] is False


@pytest.mark.parametrize("kw, message", [
    ({"every": 5, "interval": 1.0}, "--every"), ({"every": 0}, "--every"), ({"buffer": 4}, "--buffer"),
    ({"holdout": 0.9}, "--holdout"), ({"fps": 0.0}, "--fps"), ({"model": Path("/no/such.safetensors")}, "no such"),
    ({"model": None}, "--model")])
def test_bad_configs_fail_before_any_work(tmp_path, start, kw, message):
    with pytest.raises(InputError, match=message):
        run_loop(_config(tmp_path, start, **kw))
    assert not (tmp_path / "state").exists()


def test_unreadable_state_is_a_clear_error(tmp_path, start):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text("{not json")
    with pytest.raises(Exception, match="move the folder away"):
        run_loop(_config(tmp_path, start))


def test_loop_serves_a_video_file(tmp_path, start):
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 48))
    for k in range(160):
        writer.write(np.full((48, 64, 3), k % 255, dtype=np.uint8))
    writer.release()
    result = run_loop(_config(tmp_path, start, source=f"video:{path}", every=100, fps=None))
    assert result.frames == 160 and result.rounds >= 1
    window = [r for r in read_log(result.log).records if r["event"] == "window"][0]
    assert window["labeled"] == 0 and window["correct"] is None


def test_loop_and_loop_report_commands(tmp_path, start):
    from typer.testing import CliRunner

    from gprebn_edge.cli import app

    runner = CliRunner()
    state = tmp_path / "state"
    r = runner.invoke(app, ["loop", "--source", STREAM, "--state", str(state), "--model", str(start), "--every", "150",
                            "--buffer", "192", "--frames", "400", "--fps", "500"])
    assert r.exit_code == 0, r.output
    assert "400 frames (frame limit reached)" in r.stdout and "loop-report" in r.stdout
    plot, out = tmp_path / "loop.png", tmp_path / "summary.json"
    r = runner.invoke(app, ["loop-report", str(state / "metrics.jsonl"), "--plot", str(plot), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["frames"] == 400 and plot.read_bytes()[:4] == b"\x89PNG"
    assert "Online accuracy per segment" in r.stdout
    r = runner.invoke(app, ["loop", "--source", STREAM, "--state", str(tmp_path / "s2"), "--model", str(start),
                            "--every", "10", "--interval", "2"])
    assert r.exit_code == 1 and "--every" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["loop-report", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1


def test_a_bad_source_fails_before_the_state_folder_is_made(tmp_path, start):
    with pytest.raises(InputError, match="no such file"):
        run_loop(_config(tmp_path, start, source=str(tmp_path / "missing_folder")))
    assert not (tmp_path / "state").exists()
