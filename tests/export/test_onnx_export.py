"""ONNX export of folded models: graph contents, names, dynamic batch, parity with PyTorch on real
inputs, identical graphs for the adapted and the unadapted model, and nothing written on failure."""

import numpy as np
import onnx
import pytest
import torch

from gprebn_edge.adapt import AdaptConfig, adapt_model, calibration_tensors
from gprebn_edge.data.sources import open_source
from gprebn_edge.errors import GprebnError
from gprebn_edge.export.fold import fold_batchnorm
from gprebn_edge.export.onnx_export import export_onnx, onnx_parity
from gprebn_edge.models.spec import load_model


@pytest.fixture(scope="module")
def builtin():
    return load_model("builtin:small_resnet")


def _batches(source, size=250):
    return [t.numpy() for t in calibration_tensors(source, size)]


def test_builtin_export_has_no_bn_and_matches_pytorch_on_1000_images(builtin, tmp_path):
    data = open_source("synthetic:gaussian_noise:5:n=1000:split=test", builtin.preprocess)
    example = torch.from_numpy(next(iter(data.batches(2))).images)
    folded, _ = fold_batchnorm(builtin.model, example)
    path = tmp_path / "m.onnx"
    parity = export_onnx(folded, path, example, check_batches=_batches(data),
                         metadata={"preprocess": builtin.preprocess.to_dict(), "num_classes": "10"})
    assert parity.images == 1000 and parity.top1_agreement == 1.0 and parity.max_rel <= 1e-5
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 9
    assert proto.opset_import[0].version >= 17
    names = {i.name for i in proto.graph.initializer}
    assert {"conv1.weight", "conv1.bias", "layers.2.0.shortcut.0.bias", "fc.weight"} <= names
    assert {p.key for p in proto.metadata_props} == {"preprocess", "num_classes"}
    # dynamic batch: batch 1 and 7 run
    x = data.batches(7).__next__().images
    assert onnx_parity(path, folded, [x[:1], x]).top1_agreement == 1.0


def test_adapted_and_unadapted_graphs_are_identical(builtin, tmp_path):
    calib = open_source("synthetic:fog:5:n=128", builtin.preprocess)
    adapted = adapt_model(builtin, calib, AdaptConfig(batch_size=32)).model
    example = torch.from_numpy(next(iter(calib.batches(2))).images)
    protos = []
    for name, model in (("source", builtin.model), ("adapted", adapted)):
        folded, _ = fold_batchnorm(model, example)
        export_onnx(folded, tmp_path / f"{name}.onnx", example, check_batches=_batches(calib, 64))
        protos.append(onnx.load(str(tmp_path / f"{name}.onnx")))
    a, b = protos
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    assert [i.name for i in a.graph.initializer] == [i.name for i in b.graph.initializer]
    differ = [x.name for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True)
              if not np.array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))]
    assert differ and all(n.endswith((".weight", ".bias")) for n in differ)  # only the values differ


def test_failed_parity_writes_nothing(builtin, tmp_path):
    data = open_source("synthetic:clean:n=64", builtin.preprocess)
    example = torch.from_numpy(next(iter(data.batches(2))).images)
    folded, _ = fold_batchnorm(builtin.model, example)
    path = tmp_path / "m.onnx"
    with pytest.raises(GprebnError, match="does not match PyTorch"):
        export_onnx(folded, path, example, check_batches=_batches(data), min_agreement=1.01)  # impossible
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_other_suffixes(builtin, tmp_path):
    with pytest.raises(GprebnError, match=".onnx"):
        export_onnx(builtin.model, tmp_path / "m.bin", torch.zeros(1, 3, 32, 32), check_batches=[])
