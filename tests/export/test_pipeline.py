"""`gprebn-edge export`: adapted and unadapted exports of one artifact, the manifest, and clean failures."""

import json

import onnx
import pytest
import torch
from bn_zoo import ConstantPadBetween, ContiguousBetween, FunctionalConvBn, far_from_defaults
from typer.testing import CliRunner

from gprebn_edge.cli import app
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.export.pipeline import export_model

runner = CliRunner()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    path = folder / "adapted.safetensors"
    r = runner.invoke(app, ["adapt", "--model", "builtin:small_resnet", "--data", "synthetic:fog:5:n=128",
                            "--batch-size", "32", "-o", str(path)])
    assert r.exit_code == 0, r.output
    return path


def test_export_adapted_and_unadapted(artifact):
    r = runner.invoke(app, ["export", str(artifact), "--json"])
    assert r.exit_code == 0, r.output
    adapted = json.loads(r.stdout)
    r = runner.invoke(app, ["export", str(artifact), "--unadapted", "--json"])
    assert r.exit_code == 0, r.output
    source = json.loads(r.stdout)
    assert adapted["onnx"].endswith("adapted.onnx") and source["onnx"].endswith("adapted-unadapted.onnx")
    for m in (adapted, source):
        assert m["parity"]["images"] == 128 and m["parity"]["top1_agreement"] == 1.0
        assert m["parity"]["max_rel"] <= 1e-5
        assert len(m["fold"]["folded"]) == 9 and m["fold"]["skipped"] == []
        assert m["opset"] >= 17 and m["onnx_sha256"].startswith("sha256:")
    manifest = artifact.with_name("adapted.manifest.json")
    assert json.loads(manifest.read_text())["onnx_sha256"] == adapted["onnx_sha256"]
    a, b = (onnx.load(m["onnx"]) for m in (adapted, source))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert adapted["onnx_sha256"] != source["onnx_sha256"]
    r = runner.invoke(app, ["export", str(artifact)])
    assert r.exit_code == 0 and "top-1 agreement 100.00 %" in r.stdout


def test_export_trt_without_tensorrt_writes_nothing(artifact, tmp_path):
    out = tmp_path / "x.onnx"
    r = runner.invoke(app, ["export", str(artifact), "--onnx", str(out), "--trt"])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "gprebn-edge[trt]" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_export_errors(artifact, tmp_path):
    r = runner.invoke(app, ["export", str(tmp_path / "none.safetensors")])
    assert r.exit_code == 1 and "no such checkpoint" in r.stderr
    r = runner.invoke(app, ["export", str(artifact), "--onnx", str(tmp_path / "x.bin")])
    assert r.exit_code == 1 and ".onnx" in r.stderr
    r = runner.invoke(app, ["export", str(artifact), "--onnx", str(tmp_path / "x.onnx"), "--data", "/nope"])
    assert r.exit_code == 1 and "/nope" in r.stderr and "pass --data" not in r.stderr  # it was passed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--refittable"], "add --trt"), (["--workspace-mb", "64", "--fp16"], "add --trt"),
    (["--trt", "--fp16", "--int8"], "choose one"), (["--trt", "--batch", "8:4:16"], "MIN:OPT:MAX"),
    (["--trt", "--batch", "x"], "MIN:OPT:MAX")])
def test_engine_flags_are_checked_before_any_work(artifact, tmp_path, flags, message):
    r = runner.invoke(app, ["export", str(artifact), "--onnx", str(tmp_path / "x.onnx"), *flags])
    assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_untraceable_model_is_folded_in_onnx(tmp_path):
    """A model torch.fx cannot trace goes through ONNX-level folding; the manifest says where and keeps the
    exporter's TracerWarning, and parity is still checked against PyTorch."""
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 8, 3, padding=1)\n        self.bn = nn.BatchNorm2d(8)\n"
        "        self.fc = nn.Linear(8, 10)\n\n"
        "    def forward(self, x):\n"
        "        if x.mean() > -100:  # data-dependent: torch.fx cannot trace this\n"
        "            x = torch.relu(self.bn(self.conv(x)))\n"
        "        return self.fc(x.mean((2, 3)))\n\n"
        "def make():\n    return Net()\n")
    out = tmp_path / "a.safetensors"
    r = runner.invoke(app, ["adapt", "--model", f"{tmp_path / 'net.py'}:make", "--data", "synthetic:fog:5:n=64",
                            "--batch-size", "32", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(out), "--json", "--model", f"{tmp_path / 'net.py'}:make"])
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout)
    assert manifest["fold"]["where"].startswith("onnx") and [f["bn"] for f in manifest["fold"]["folded"]] == ["bn"]
    assert manifest["parity"]["top1_agreement"] == 1.0 and manifest["parity"]["max_rel"] <= 1e-5
    assert any("TracerWarning" in w for w in manifest["warnings"])
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(manifest["onnx"]).graph.node}


class TwoLevels(torch.nn.Module):
    """One BN of each kind: folded by torch.fx (functional conv), left by torch.fx but folded in the ONNX
    graph (`.contiguous()` in between), and kept (constant pad in between)."""

    def __init__(self):
        super().__init__()
        self.a = FunctionalConvBn(cin=3, cout=8, bias=False)
        self.b = ContiguousBetween()
        self.c = ConstantPadBetween()
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.c(self.b(self.a(x)[:, :4])[:, :4])
        return self.head(x).mean((2, 3))


def test_manifest_says_where_each_bn_was_folded_or_why_it_was_kept(tmp_path):
    torch.manual_seed(0)
    model = far_from_defaults(TwoLevels())
    x = torch.randn(32, 3, 8, 8).numpy()
    meta = {"preprocess": Preprocess().to_dict(), "num_classes": 4}
    manifest = export_model(model, meta, tmp_path / "m.onnx", [x])
    fold = manifest["fold"]
    assert [(f["bn"], f["into"], f["where"]) for f in fold["folded"]] == [("a.bn", "a.conv", "pytorch"),
                                                                          ("b.bn", "b.conv", "onnx")]
    assert "`contiguous`" in fold["folded"][1]["pytorch_skipped"]
    assert [s["bn"] for s in fold["skipped"]] == ["c.bn"] and "constant pad" in fold["skipped"][0]["reason"]
    ops = [n.op_type for n in onnx.load(manifest["onnx"]).graph.node]
    assert ops.count("BatchNormalization") == 1
    assert manifest["parity"]["top1_agreement"] == 1.0 and manifest["parity"]["max_rel"] <= 1e-5
