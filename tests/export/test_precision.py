"""fp16 and int8 Q/DQ ONNX files (export/precision.py): made by the maintained tools, checked against PyTorch
fp32 with onnxruntime, floors that fail an export (file kept, named), int8 refusals, and operators the
quantizer leaves in float."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from gprebn_edge.cli import app
from gprebn_edge.data.sources import collect, open_source
from gprebn_edge.errors import InputError
from gprebn_edge.export import precision
from gprebn_edge.export.pipeline import export_model
from gprebn_edge.export.precision import FLOORS, MIN_INT8_IMAGES, PrecisionBelowFloor, onnx_precision
from gprebn_edge.models.spec import load_model

runner = CliRunner()


@pytest.fixture(scope="module")
def builtin():
    return load_model("builtin:small_resnet")


@pytest.fixture(scope="module")
def images(builtin):
    return collect(open_source("synthetic:gaussian_noise:5:n=96", builtin.preprocess, limit=96))[0]


def _meta(loaded):
    return {"preprocess": loaded.preprocess.to_dict(), "num_classes": 10}


def _types(path):
    proto = onnx.load(str(path))
    return proto, {t.data_type for t in proto.graph.initializer}, [n.op_type for n in proto.graph.node]


def test_fp16_onnx_keeps_float32_io_and_is_checked(builtin, images, tmp_path):
    out = tmp_path / "m-fp16.onnx"
    manifest = export_model(builtin.model, _meta(builtin), out, [images], which="source", precision="fp16")
    proto, dtypes, _ = _types(out)
    assert onnx_precision(proto) == "fp16" and onnx.TensorProto.FLOAT16 in dtypes
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(float)"] == [o.type for o in session.get_outputs()]
    p = manifest["parity"]
    assert manifest["precision"] == "fp16" and p["reference"] == "PyTorch fp32" and p["images"] == 96
    # really half precision: larger than fp32's error (<1e-5), within the floor
    assert 1e-5 < p["max_rel"] <= FLOORS["fp16"].max_rel and p["top1_agreement"] >= FLOORS["fp16"].top1_agreement
    assert manifest["fp32_parity"]["max_rel"] <= 1e-5  # the float32 export it was made from was checked too
    # the figures are what onnxruntime gives now, against PyTorch fp32
    got = session.run(["logits"], {"input": images})[0]
    ref = builtin.model(torch.from_numpy(images)).detach().numpy()
    assert p["max_rel"] == pytest.approx(float(np.abs(got - ref).max() / np.abs(ref).max()), rel=1e-6)
    on_disk = json.loads(out.with_name("m-fp16.manifest.json").read_text())
    assert on_disk["onnx_sha256"] == manifest["onnx_sha256"] and on_disk["precision"] == "fp16"


def test_int8_onnx_is_qdq_symmetric_and_checked(builtin, images, tmp_path):
    out = tmp_path / "m-int8.onnx"
    manifest = export_model(builtin.model, _meta(builtin), out, [images], which="source", precision="int8")
    proto, _, ops = _types(out)
    assert onnx_precision(proto) == "int8" and "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    zero_points = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # TensorRT: zero point 0
    p = manifest["parity"]
    assert p["top1_agreement"] >= FLOORS["int8"].top1_agreement and 1e-3 < p["max_rel"] <= FLOORS["int8"].max_rel
    assert manifest["kept_float"] == {"Add": 3, "GlobalAveragePool": 1}  # no int8 rule in the quantizer


def test_below_the_floor_fails_but_keeps_the_file(builtin, images, tmp_path, monkeypatch):
    monkeypatch.setitem(FLOORS, "fp16", precision.Floor(top1_agreement=1.0, max_rel=1e-6))
    out = tmp_path / "m-fp16.onnx"
    with pytest.raises(PrecisionBelowFloor, match=r"below its floor.*kept for inspection at .*m-fp16\.onnx") as e:
        export_model(builtin.model, _meta(builtin), out, [images], which="source", precision="fp16")
    assert "\n" not in str(e.value)
    assert out.is_file() and json.loads(out.with_name("m-fp16.manifest.json").read_text())["precision"] == "fp16"


def test_int8_needs_enough_images(tmp_path):
    with pytest.raises(InputError, match=f"at least {MIN_INT8_IMAGES}"):
        precision.to_int8(tmp_path / "a.onnx", tmp_path / "b.onnx", [np.zeros((63, 3, 32, 32), np.float32)])
    assert list(tmp_path.iterdir()) == []


class Sine(torch.nn.Module):
    """A conv, BN, then an operator onnxruntime's quantizer has no int8 rule for (Sin)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.sin(self.bn(self.conv(x))).mean((2, 3)))


def test_unsupported_operator_stays_float_and_is_said(builtin, images, tmp_path):
    torch.manual_seed(0)
    model = Sine().eval()
    out = tmp_path / "sine-int8.onnx"
    manifest = export_model(model, _meta(builtin), out, [images], which="source", precision="int8")
    assert manifest["kept_float"]["Sin"] == 1
    nodes = onnx.load(str(out)).graph.node
    (sin,) = [n for n in nodes if n.op_type == "Sin"]
    assert not [n for n in nodes if sin.output[0] in n.input and n.op_type == "QuantizeLinear"]  # float out
    assert manifest["parity"]["top1_agreement"] >= FLOORS["int8"].top1_agreement  # and the file still works


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("precision") / "adapted.safetensors"
    r = runner.invoke(app, ["adapt", "--model", "builtin:small_resnet", "--data", "synthetic:fog:5:n=96",
                            "--batch-size", "32", "-o", str(path)])
    assert r.exit_code == 0, r.output
    return path


def test_cli_fp16_and_int8(artifact):
    r = runner.invoke(app, ["export", str(artifact), "--fp16", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["onnx"].endswith("adapted-fp16.onnx")
    r = runner.invoke(app, ["export", str(artifact), "--int8", "--data", "synthetic:fog:5:n=80", "--json"])
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout)
    assert manifest["onnx"].endswith("adapted-int8.onnx") and manifest["precision"] == "int8"
    assert manifest["kept_float"] and manifest["parity"]["images"] == 80


@pytest.mark.parametrize("flags, message", [
    (["--int8"], "pass --data IMAGES"), (["--int8", "--data", "synthetic:fog:5:n=40"], "at least 64"),
    (["--fp16", "--int8"], "choose one")])
def test_cli_refusals(artifact, tmp_path, flags, message):
    r = runner.invoke(app, ["export", str(artifact), "--onnx", str(tmp_path / "x.onnx"), *flags])
    assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_below_the_floor_exits_1_naming_the_file(artifact, tmp_path, monkeypatch):
    monkeypatch.setitem(FLOORS, "int8", precision.Floor(top1_agreement=1.0, max_rel=1e-6))
    out = tmp_path / "x.onnx"
    r = runner.invoke(app, ["export", str(artifact), "--onnx", str(out), "--int8", "--data", "synthetic:fog:5:n=80"])
    assert r.exit_code == 1 and "below its floor" in r.stderr and str(out) in r.stderr.replace("\n", "")
    assert out.is_file()
