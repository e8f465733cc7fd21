"""Integrity: an ONNX file or engine that differs from the hash its export manifest records is refused, in one
line naming both files and --no-verify (which overrides); a run that replaces an output file says so; what the
tool writes is strict JSON; the loop does not start serving a model whose outputs are not finite."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from gprebn_edge.checkpoint import load_checkpoint, save_checkpoint
from gprebn_edge.cli import app
from gprebn_edge.errors import ArtifactError
from gprebn_edge.io import finite_json, strict_json
from gprebn_edge.runtime.loading import open_runner, verify_file

runner = CliRunner()
DATA = "synthetic:fog:5:n=8"


def strict_loads(text: str):
    def refuse(name: str):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def copy_export(onnx_file: Path, folder: Path, name: str = "m") -> Path:
    out = folder / f"{name}.onnx"
    shutil.copy(onnx_file, out)
    shutil.copy(onnx_file.with_name(onnx_file.stem + ".manifest.json"), folder / f"{name}.manifest.json")
    return out


def tamper(path: Path, value: float | None = None, out: Path | None = None) -> Path:
    """Change the last float initializer (the classifier's bias): +0.5, or set to `value` (NaN, say)."""
    model = onnx.load(str(path))
    init = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT][-1]
    a = numpy_helper.to_array(init).copy()
    a[...] = value if value is not None else a + 0.5
    init.CopyFrom(numpy_helper.from_array(a.astype(np.float32), init.name))
    onnx.save(model, str(out or path))
    return out or path


def one_line(r, *words: str) -> str:
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# -- the hash check -----------------------------------------------------------------------------------------------
def test_a_changed_onnx_is_refused_and_no_verify_overrides(exported, tmp_path):
    model = copy_export(exported.onnx, tmp_path)
    assert verify_file(model) is True
    with open_runner(model) as r:
        r.infer(exported.images[:2])
    tamper(model)
    with pytest.raises(ArtifactError, match="does not match its manifest") as e:
        open_runner(model)
    assert str(model) in str(e.value) and "m.manifest.json" in str(e.value) and "--no-verify" in str(e.value)
    with open_runner(model, verify=False) as r:  # the override
        r.infer(exported.images[:2])


def test_what_is_checked_and_what_is_not(exported, tmp_path):
    model = copy_export(exported.onnx, tmp_path)
    manifest = tmp_path / "m.manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot read .*m.manifest.json.*--no-verify"):
        open_runner(model)
    manifest.write_text(json.dumps({"onnx": "m.onnx"}))  # records no hash: nothing to check against
    assert verify_file(model) is False
    manifest.unlink()  # an ONNX file without a manifest runs as before
    assert verify_file(model) is False
    open_runner(model)


def test_an_engine_is_checked_against_the_hash_export_recorded(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not really an engine")
    manifest = tmp_path / "m.manifest.json"
    good = "sha256:" + hashlib.sha256(engine.read_bytes()).hexdigest()
    trt = {"engine": str(engine), "engine_sha256": good}
    manifest.write_text(json.dumps({"onnx_sha256": "sha256:0", "tensorrt": trt}))
    assert verify_file(engine) is True
    open_runner(engine)  # building the runner needs no TensorRT
    engine.write_bytes(b"another engine")
    with pytest.raises(ArtifactError, match="m.engine does not match its manifest"):
        open_runner(engine)
    open_runner(engine, verify=False)


def test_commands_refuse_a_changed_onnx(exported, tmp_path):
    good = copy_export(exported.onnx, tmp_path, "good")
    bad = tamper(copy_export(exported.onnx, tmp_path, "bad"))
    bench = ["bench", str(bad), "--iters", "2", "--warmup", "1"]
    one_line(runner.invoke(app, bench), "bad.onnx", "bad.manifest.json", "--no-verify")
    assert runner.invoke(app, [*bench, "--no-verify"]).exit_code == 0
    compare = ["compare", str(good), str(bad), "--data", DATA, "--latency-iters", "0"]
    one_line(runner.invoke(app, compare), "bad.onnx", "--no-verify")
    assert runner.invoke(app, [*compare, "--no-verify"]).exit_code == 0
    state = tmp_path / "state"
    loop = ["loop", "--onnx", str(bad), "--state", str(state), "--source", DATA, "--frames", "3"]
    one_line(runner.invoke(app, loop), "bad.onnx", "--no-verify")
    assert not state.exists()  # refused before the state folder is made
    r = runner.invoke(app, [*loop, "--no-verify"])
    assert r.exit_code == 0, r.output


# -- replaced outputs ---------------------------------------------------------------------------------------------
def test_a_run_that_replaces_an_output_says_so(exported, tmp_path):
    model = copy_export(exported.onnx, tmp_path)
    out = tmp_path / "b.json"
    args = ["bench", str(model), "--iters", "2", "--warmup", "1", "--json", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "replaced" not in r.stderr
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and f"replaced existing {out}" in r.stderr
    onnx_out = tmp_path / "e.onnx"
    export = ["export", str(exported.checkpoint), "--onnx", str(onnx_out), "--data", DATA, "--check-images", "8"]
    assert "replaced" not in runner.invoke(app, export).stderr
    r = runner.invoke(app, export)
    assert r.exit_code == 0 and f"replaced existing {onnx_out}, {tmp_path / 'e.manifest.json'}" in r.stderr
    ckpt = tmp_path / "a.safetensors"
    adapt = ["adapt", "--model", "builtin:small_resnet", "--data", "synthetic:fog:5:n=24", "--batch-size", "8",
             "-o", str(ckpt)]
    assert "replaced" not in runner.invoke(app, adapt).stderr
    r = runner.invoke(app, adapt)
    assert r.exit_code == 0 and f"replaced existing {ckpt}" in r.stderr


# -- strict JSON ----------------------------------------------------------------------------------------------------
def test_strict_json_writes_null_for_non_finite_numbers(tmp_path):
    value = {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), np.float64("nan"))], "c": "NaN"}
    assert finite_json(value) == {"a": None, "b": [1.5, None, [None, None]], "c": "NaN"}
    assert strict_loads(strict_json(value)) == finite_json(value)
    assert strict_loads(strict_json({"x": object()}, default=lambda _: float("nan"))) == {"x": None}
    import torch

    save_checkpoint(tmp_path / "c.safetensors", {"w": torch.zeros(1)}, {"summary": {"entropy": float("nan")}})
    assert load_checkpoint(tmp_path / "c.safetensors")[1]["summary"] == {"entropy": None}


def test_manifest_and_json_outputs_are_strict(exported, tmp_path):
    model = copy_export(exported.onnx, tmp_path)
    strict_loads((tmp_path / "m.manifest.json").read_text())
    out = tmp_path / "c.json"
    r = runner.invoke(app, ["compare", str(model), str(model), "--data", DATA, "--latency-iters", "0",
                            "--json", str(out)])
    assert r.exit_code == 0, r.output
    strict_loads(out.read_text())


# -- the loop does not serve a non-finite model ---------------------------------------------------------------------
def test_loop_refuses_to_serve_a_non_finite_model(exported, tmp_path):
    nan = tamper(exported.onnx, float("nan"), out=tmp_path / "nan.onnx")  # no manifest beside it
    state = tmp_path / "state"
    loop = ["loop", "--state", str(state), "--source", DATA, "--frames", "3"]
    one_line(runner.invoke(app, [*loop, "--onnx", str(nan)]), "nan.onnx", "non-finite")
    assert not state.exists()
    # a state folder whose serving model became non-finite: refused on resume, at the first frame
    assert runner.invoke(app, [*loop, "--onnx", str(exported.onnx)]).exit_code == 0
    served = json.loads((state / "state.json").read_text())["onnx"]
    shutil.copy(nan, state / served)
    (state / served).with_name(Path(served).stem + ".manifest.json").unlink(missing_ok=True)
    one_line(runner.invoke(app, [*loop, "--frames", "6"]), served, "non-finite")
