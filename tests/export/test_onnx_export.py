"""ONNX export of folded models: graph contents, names, dynamic batch, parity with PyTorch on real
inputs, identical graphs for the adapted and the unadapted model, and nothing written on failure."""

import copy

import numpy as np
import onnx
import pytest
import torch

from gprebn_edge.adaptation import AdaptConfig, adapt_model, calibration_tensors
from gprebn_edge.data.sources import open_source
from gprebn_edge.errors import GprebnError
from gprebn_edge.export.fold import fold_batchnorm
from gprebn_edge.export.onnx_export import DEFAULT_MAX_REL, export_onnx, onnx_parity, parity_limit
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


def test_parity_limit_is_the_floor_or_a_multiple_of_the_models_own_fp32_noise(builtin):
    x = open_source("synthetic:fog:5:n=8", builtin.preprocess).batches(8).__next__().images
    noise, limit = parity_limit(builtin.model, x)
    assert 0 < noise < 1e-6 and limit == DEFAULT_MAX_REL
    # a model that adds and removes a large offset: its fp32 rounding alone exceeds 1e-5 of the logits
    shift, unshift = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    with torch.no_grad():
        for layer, bias in ((shift, 1000.0), (unshift, -1000.0)):
            layer.weight.copy_(torch.eye(16))
            layer.bias.fill_(bias)
    noise, limit = parity_limit(torch.nn.Sequential(shift, unshift).eval(),
                                np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    assert limit == pytest.approx(8 * noise) and limit > DEFAULT_MAX_REL


def test_graph_does_not_depend_on_weight_values(tmp_path):
    """An untrained model's folded biases are all zero; the exporter must not merge equal initializers
    (it would put Identity nodes in the graph and drop names), or adapted and source graphs would differ."""
    from gprebn_edge.models.builtin import small_resnet

    torch.manual_seed(0)
    fresh = small_resnet().eval()
    perturbed = copy.deepcopy(fresh)
    with torch.no_grad():
        for m in perturbed.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.bias.uniform_(-1, 1)
    x = torch.randn(4, 3, 32, 32)
    protos = []
    for name, model in (("fresh", fresh), ("perturbed", perturbed)):
        folded, _ = fold_batchnorm(model, x[:2])
        export_onnx(folded, tmp_path / f"{name}.onnx", x[:2], check_batches=[x.numpy()])
        protos.append(onnx.load(str(tmp_path / f"{name}.onnx")))
    a, b = ([(n.op_type, list(n.input), list(n.output)) for n in p.graph.node] for p in protos)
    assert a == b and "Identity" not in {op for op, _, _ in a}
    assert [i.name for i in protos[0].graph.initializer] == [i.name for i in protos[1].graph.initializer]
    assert [i.name for i in protos[0].graph.input] == ["input"]


def test_skipped_batchnorms_stay_batchnorm_nodes_with_their_names(tmp_path):
    """A BN our fold skips must not be fused by the exporter behind our back (anonymous weights)."""
    from bn_zoo import TwoUses, far_from_defaults

    model = far_from_defaults(TwoUses())
    x = torch.randn(16, 4, 6, 6)
    folded, report = fold_batchnorm(model, x[:2])
    assert [b for b, _ in report.skipped] == ["bn1", "bn2"]
    parity = export_onnx(folded, tmp_path / "m.onnx", x[:2], check_batches=[x.numpy()])
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [n.op_type for n in proto.graph.node].count("BatchNormalization") == 2
    names = {i.name for i in proto.graph.initializer}
    assert {"bn1.running_mean", "bn2.running_var", "conv.weight"} <= names
    assert not any(n.startswith("onnx::") for n in names) and parity.max_rel <= 1e-5


def test_non_finite_outputs_fail_the_parity_check_and_write_nothing(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten()).eval()
    with torch.no_grad():
        model[1].running_var.fill_(-1.0)  # sqrt of a negative variance: NaN everywhere
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous good file")
    x = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    with pytest.raises(GprebnError, match="not finite"):
        export_onnx(model, out, torch.from_numpy(x[:2]), check_batches=[x], max_rel=1e-5)
    assert out.read_bytes() == b"previous good file"
