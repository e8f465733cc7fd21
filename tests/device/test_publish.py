"""--publish: a Triton model repository of the gated models (device/publish.py). config.pbtxt parses as
Triton's ModelConfig; versions increase, are complete when visible and the newest `keep` stay; a read-only,
full or deleted folder is reported while serving goes on, and leaves nothing half-written; and an
independent consumer process that polls the repository while the loop is SIGKILLed at random moments never
sees a partial or ungated version."""

from __future__ import annotations

import errno
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file
from gprebn_edge.cli import app
from gprebn_edge.device import publish as publish_module
from gprebn_edge.device.publish import Publisher, PublishError, config_pbtxt, parse_publish
from gprebn_edge.device.report import read_log, summarize


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    from gprebn_edge.export.pipeline import export_artifact

    root = tmp_path_factory.mktemp("publish")
    adapt_to_file("builtin:small_resnet", "synthetic:clean:n=64", root / "start.safetensors",
                  AdaptConfig(batch_size=32))
    export_artifact(root / "start.safetensors", root / "a.onnx", check_images=16)
    export_artifact(root / "start.safetensors", root / "b.onnx", unadapted=True, check_images=16)
    return {"start": root / "start.safetensors", "a": root / "a.onnx", "b": root / "b.onnx"}


def _manifest(onnx: Path) -> Path:
    return onnx.with_name(onnx.stem + ".manifest.json")


def test_config_pbtxt_is_a_triton_model_config(made, tmp_path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    repo = Publisher(f"{tmp_path}:classifier", keep=3)
    repo.publish(made["a"], _manifest(made["a"]), 0)
    config = text_format.Parse((repo.root / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "classifier" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
    assert [(t.name, list(t.dims), t.data_type) for t in config.input] == [
        ("input", [-1, 3, 32, 32], model_config_pb2.TYPE_FP32)]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [-1, 10])]
    assert config.version_policy.latest.num_versions == 1
    plan = config_pbtxt("m", "tensorrt_plan", [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float16"}],
                        [{"name": "y", "shape": ["batch", 5]}])
    parsed = text_format.Parse(plan, model_config_pb2.ModelConfig())
    assert parsed.platform == "tensorrt_plan" and parsed.input[0].data_type == model_config_pb2.TYPE_FP16


def test_versions_increase_are_complete_and_the_newest_are_kept(made, tmp_path):
    repo = Publisher(str(tmp_path / "repo"), keep=2)
    assert repo.root == tmp_path / "repo" / "gprebn"
    assert parse_publish("/x/y:m") == (Path("/x/y"), "m") and parse_publish("/x/y") == (Path("/x/y"), "gprebn")
    with pytest.raises(Exception, match="plain model name"):
        parse_publish("/x:a b")
    published = [repo.publish(made[k], _manifest(made[k]), r) for r, k in enumerate("abab")]
    assert [p.version for p in published if p] == [1, 2, 3, 4]
    assert repo.publish(made["b"], _manifest(made["b"]), 9) is None  # already the newest: a resume
    assert repo.versions() == [3, 4]
    current = json.loads((repo.root / "current.json").read_text())
    assert current["version"] == 4 and current["model"] == "4/model.onnx" and current["manifest"] == "4/manifest.json"
    manifest = json.loads((repo.root / "4" / "manifest.json").read_text())
    assert manifest["round"] == 3 and manifest["sha256"] == current["sha256"]
    assert manifest["export"]["onnx_sha256"] == manifest["sha256"]  # the very file export checked
    assert sorted(p.name for p in repo.root.iterdir()) == ["3", "4", "config.pbtxt", "current.json"]


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_failed_publish_leaves_nothing_half_written(made, tmp_path, monkeypatch, fault):
    repo = Publisher(str(tmp_path / "repo"), keep=3)
    repo.publish(made["a"], _manifest(made["a"]), 0)
    before = sorted(p.name for p in repo.root.iterdir())
    real_copy = publish_module._copy_hashed

    def full(src, dst):  # half the file, then the disk is full
        dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(publish_module, "_copy_hashed", full if fault == "full" else read_only)
    with pytest.raises(PublishError, match="cannot publish round 1 .*(No space|Read-only)"):
        repo.publish(made["b"], _manifest(made["b"]), 1)
    assert sorted(p.name for p in repo.root.iterdir()) == before  # no temporary folder, no new version
    monkeypatch.setattr(publish_module, "_copy_hashed", real_copy)
    assert repo.publish(made["b"], _manifest(made["b"]), 1).version == 2


def test_publish_failures_are_reported_serving_goes_on_and_loop_report_lists_them(made, tmp_path, monkeypatch):
    """The repository folder is deleted while the loop runs, and every publish after round 0 fails (a read-only
    folder, simulated: root can write anywhere): one error line each, serving goes on, exit 0."""
    calls = {"n": 0}
    real = publish_module.Publisher._publish

    def flaky(self, model, manifest, round_id):
        calls["n"] += 1
        if calls["n"] == 1:
            out = real(self, model, manifest, round_id)
            shutil.rmtree(self.root.parent)  # deleted under the running loop
            return out
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(publish_module.Publisher, "_publish", flaky)
    state, repo = tmp_path / "st", tmp_path / "repo"
    r = CliRunner().invoke(app, ["loop", "--model", str(made["start"]), "--source",
                                 "stream:clean*60,gaussian_noise-5*240",
                                 "--state", str(state), "--every", "60", "--buffer", "128", "--fps", "300",
                                 "--publish", f"{repo}:m"])
    assert r.exit_code == 0, r.output
    assert "300 frames (source exhausted)" in r.stdout
    summary = summarize(read_log(state / "metrics.jsonl"))
    assert len(summary["published"]) == 1 and summary["published"][0]["round"] == 0
    assert len(summary["publish_failures"]) == calls["n"] - 1 >= 1
    assert all("Read-only" in f["error"] for f in summary["publish_failures"])
    assert r.stderr.count("error: cannot publish") == len(summary["publish_failures"])
    report = CliRunner().invoke(app, ["loop-report", str(state / "metrics.jsonl")])
    assert "Publish failures" in report.stdout and "published versions (failed)" in report.stdout


# The loop under test, in its own process. Every odd round's candidate is forced to fail its gates (its real
# gate result is kept in the log): such a candidate must never appear in the repository.
LOOP = """
import sys
from pathlib import Path
from gprebn_edge.device import worker
from gprebn_edge.device.loop import LoopConfig, run_loop

class Rejected:
    passed = False
    reasons = ["forced by the test: odd rounds fail their gates"]
    def __init__(self, real):
        self.to_dict = real.to_dict

real_gate = worker.Worker._gate
def gate(self, files, holdout, readapter, serving, outcome):
    result, logits = real_gate(self, files, holdout, readapter, serving, outcome)
    return (Rejected(result) if outcome.record["round"] % 2 else result), logits

worker.Worker._gate = gate
run_loop(LoopConfig(state=Path(sys.argv[1]), source=sys.argv[2], model=Path(sys.argv[3]), every=60, buffer=96,
                    min_frames=48, window=60, fps=150.0, publish=sys.argv[4] + ":m", keep=3))
"""

# The consumer: polls the repository like a serving engine would, and loads every new version it sees.
CONSUMER = """
import hashlib, json, sys, time
from pathlib import Path
import numpy as np
import onnxruntime as ort

root, stop, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
seen, problems, polls = {}, [], 0
while not stop.exists():
    polls += 1
    try:
        names = [p.name for p in root.iterdir()] if root.is_dir() else []
    except FileNotFoundError:
        names = []
    for name in names:
        if not name.isdecimal() or name in seen:
            continue
        d = root / name
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            data = (d / "model.onnx").read_bytes()
        except FileNotFoundError:
            if not d.exists():   # pruned between the listing and the read: not a partial version
                continue
            problems.append(f"version {name} is incomplete")
            seen[name] = None
            continue
        ok_hash = "sha256:" + hashlib.sha256(data).hexdigest() == manifest["sha256"]
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        x = np.zeros((1, 3, 32, 32), np.float32)
        logits = session.run(None, {session.get_inputs()[0].name: x})[0]
        runs = bool(np.isfinite(logits).all()) and logits.shape == (1, 10)
        seen[name] = {"round": manifest["round"], "sha_ok": ok_hash, "runs": runs}
        if not (ok_hash and runs):
            problems.append(f"version {name}: sha256 ok {ok_hash}, runs {runs}")
    time.sleep(0.02)
out.write_text(json.dumps({"seen": seen, "problems": problems, "polls": polls}))
"""


def test_a_consumer_never_sees_a_partial_or_ungated_version_while_the_loop_is_killed(made, tmp_path):
    state, repo, stop, out = tmp_path / "st", tmp_path / "repo", tmp_path / "stop", tmp_path / "seen.json"
    stream = "stream:clean*90,gaussian_noise-5*600,fog-5*600"
    consumer = subprocess.Popen([sys.executable, "-c", CONSUMER, str(repo / "m"), str(stop), str(out)])
    rng = random.Random(18)
    kills = 0
    try:
        for run in range(4):
            last = run == 3
            loop = subprocess.Popen([sys.executable, "-c", LOOP, str(state), stream, str(made["start"]), str(repo)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if last:
                _, err = loop.communicate(timeout=180)
                assert loop.returncode == 0, err
                break
            time.sleep(rng.uniform(3.0, 8.0))  # start-up, serving, a round, a publish: any moment
            if loop.poll() is None:
                loop.send_signal(signal.SIGKILL)
                kills += 1
            loop.wait(timeout=30)
    finally:
        stop.touch()
        consumer.wait(timeout=60)
    seen = json.loads(out.read_text())
    rounds = [r for r in read_log(state / "metrics.jsonl").records if r["event"] == "round"]
    verdict = {r["round"]: r["passed"] for r in rounds}
    published = {int(v["round"]) for v in seen["seen"].values() if v}
    counts = {"kills": kills, "versions_seen": len(seen["seen"]), "polls": seen["polls"], "rounds": len(rounds),
              "rounds_passed": sum(verdict.values()), "rounds_rejected": sum(not p for p in verdict.values()),
              "published_rounds": sorted(published)}
    print("consumer:", json.dumps(counts))
    assert not seen["problems"], seen["problems"]
    assert kills >= 2 and len(seen["seen"]) >= 3 and counts["rounds_rejected"] >= 1
    # every version the consumer saw is round 0 (what the loop started serving) or a round that passed
    assert all(r == 0 or verdict.get(r) is True for r in published), (published, verdict)
    assert not any(r % 2 for r in published)  # never a forced-rejected candidate
    names = sorted(p.name for p in (repo / "m").iterdir())
    assert not [n for n in names if n.startswith(".")]  # no leftovers once the last run published
    assert len([n for n in names if n.isdecimal()]) <= 3
