"""ONNX-level BatchNorm folding, the fallback for models torch.fx cannot trace: the numpy maths against
fold_math.py, the zoo of BN patterns against fx folding and PyTorch, hand-built graphs for what the exporter
does not emit (Gemm with transB=0, Constant weights), an untraceable model, and the built-in model against
the export of its fx-folded copy."""

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from bn_zoo import (  # the zoo of BN patterns, shared with fx folding
    ONNX_FOLDS,
    ZOO,
    TwoUses,
    Untraceable,
    far_from_defaults,
)
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from gprebn_edge.errors import ModelError
from gprebn_edge.export.fold import fold_batchnorm
from gprebn_edge.export.onnx_export import export_onnx, onnx_parity
from gprebn_edge.export.onnx_fold import (
    export_bn_onnx,
    export_folded_onnx_fallback,
    fold_onnx_batchnorm,
)
from gprebn_edge.models.spec import load_model


def _run(proto: onnx.ModelProto, x: np.ndarray, name: str = "input") -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {name: x})[0]


def _max_rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_folds_like_fx_and_matches_pytorch(name):
    """The ONNX level folds what torch.fx folds (plus what only the graph shows foldable: ONNX_FOLDS), under
    the same names and with bit-identical weights, and the result computes what PyTorch computes."""
    factory, shape, folded, skipped = ZOO[name]
    extra = ONNX_FOLDS.get(name, [])
    torch.manual_seed(0)
    model = far_from_defaults(factory())
    x = torch.randn(shape)
    proto, report = fold_onnx_batchnorm(export_bn_onnx(model, x))
    gm, fx_report = fold_batchnorm(model, x)
    assert [b for b, _ in fx_report.folded] == folded and [b for b, _ in fx_report.skipped] == skipped
    assert report.folded == fx_report.folded + extra
    assert [b for b, _ in report.skipped] == [b for b in skipped if b not in dict(extra)]
    assert all(report.where[b] == "onnx" for b, _ in report.folded)
    if name == "constant-pad-between":
        assert "constant pad" in report.skipped[0][1]
    assert _ops(proto).count("BatchNormalization") == len(report.skipped)
    names = {t.name for t in proto.graph.initializer}
    for bn, producer in report.folded:
        assert {f"{producer}.weight", f"{producer}.bias"} <= names
        assert not any(n.startswith(f"{bn}.") for n in names)
    # one maths for both levels: the export of the fx-folded model holds the very same folded values
    fx_values = {t.name: numpy_helper.to_array(t) for t in export_bn_onnx(gm, x).graph.initializer}
    for _, producer in fx_report.folded:
        for suffix in (".weight", ".bias"):
            value = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == producer + suffix))
            assert value.dtype == np.float32 and np.array_equal(value, fx_values[producer + suffix])
    xs = torch.randn(64, *shape[1:])
    with torch.no_grad():
        ref = model(xs).numpy()
    assert _max_rel(_run(proto, xs.numpy()), ref) <= 1e-5
    assert _max_rel(_run(proto, xs[:1].numpy()), ref[:1]) <= 1e-5  # dynamic batch


def test_shared_weights_are_not_folded():
    model = far_from_defaults(TwoUses())
    x = torch.randn(64, 4, 6, 6)
    proto, report = fold_onnx_batchnorm(export_bn_onnx(model, x[:2]))
    assert not report.folded and [b for b, _ in report.skipped] == ["bn1", "bn2"]
    assert all("shared" in reason for _, reason in report.skipped)
    with torch.no_grad():
        assert _max_rel(_run(proto, x.numpy()), model(x).numpy()) <= 1e-5


def _deduplicated_export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """What the exporter emits with keep_initializers_as_inputs=False: equal initializers merged behind
    Identity nodes (at BN defaults, weight == running_var and bias == running_mean)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], training=torch.onnx.TrainingMode.PRESERVE,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def test_default_statistics_export_without_identity_nodes_and_fold_through_them_anyway():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6)).eval()
    x = torch.randn(64, 4, 8, 8)
    exported = export_bn_onnx(model, x[:2])
    assert "Identity" not in _ops(exported) and [i.name for i in exported.graph.input] == ["input"]
    deduplicated = _deduplicated_export(model, x[:2])
    assert "Identity" in _ops(deduplicated)
    for graph in (exported, deduplicated):
        proto, report = fold_onnx_batchnorm(graph)
        assert report.folded == [("1", "0"), ("4", "3")] and not report.skipped
        assert _ops(proto) == ["Conv", "Relu", "Conv"]
        assert [t.name for t in proto.graph.initializer] == ["0.weight", "0.bias", "3.weight", "3.bias"]
        with torch.no_grad():
            assert _max_rel(_run(proto, x.numpy()), model(x).numpy()) <= 1e-5


def test_the_input_graph_is_left_alone():
    model = far_from_defaults(ZOO["conv-bn-relu"][0]())
    exported = export_bn_onnx(model, torch.randn(2, 4, 6, 6))
    before = exported.SerializeToString()
    fold_onnx_batchnorm(exported)
    assert exported.SerializeToString() == before


def _bn_graph(producer: onnx.NodeProto, inits: list[onnx.TensorProto], x_shape: list, y_shape: list,
              extra_nodes: tuple = ()) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = y_shape[1]
    stats = {"bn.weight": rng.normal(0, 1.5, c), "bn.bias": rng.normal(0, 1, c),
             "bn.running_mean": rng.normal(0, 2, c), "bn.running_var": rng.uniform(0.1, 3, c)}
    bn = helper.make_node("BatchNormalization", ["z", *stats], ["y"], epsilon=1e-3)
    graph = helper.make_graph([*extra_nodes, producer, bn], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              inits + [numpy_helper.from_array(v.astype(np.float32), k) for k, v in stats.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("trans_b,c_shape", [(0, (1, 5)), (1, (5,)), (0, None), (1, (1,))])
def test_gemm_with_alpha_beta_and_either_weight_layout(trans_b, c_shape):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 7) if trans_b else (7, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "fc.weight")]
    inputs = ["x", "fc.weight"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array(rng.normal(size=c_shape).astype(np.float32), "fc.bias"))
        inputs.append("fc.bias")
    gemm = helper.make_node("Gemm", inputs, ["z"], alpha=0.7, beta=1.3, transB=trans_b)
    model = _bn_graph(gemm, inits, ["N", 7], ["N", 5])
    proto, report = fold_onnx_batchnorm(model)
    assert report.folded == [("bn", "fc")] and _ops(proto) == ["Gemm"]
    assert [t.name for t in proto.graph.initializer] == ["fc.weight", "fc.bias"]
    x = rng.normal(size=(64, 7)).astype(np.float32)
    assert _max_rel(_run(proto, x, "x"), _run(model, x, "x")) <= 1e-5


def test_constant_node_weight_is_folded_into_an_initializer():
    rng = np.random.default_rng(2)
    w = helper.make_node("Constant", [], ["conv.weight"],
                         value=numpy_helper.from_array(rng.normal(size=(6, 4, 3, 3)).astype(np.float32)))
    conv = helper.make_node("Conv", ["x", "conv.weight"], ["z"], group=1)
    model = _bn_graph(conv, [], ["N", 4, 5, 5], ["N", 6, 3, 3], extra_nodes=(w,))
    proto, report = fold_onnx_batchnorm(model)
    assert report.folded == [("bn", "conv")] and _ops(proto) == ["Conv"]
    assert [t.name for t in proto.graph.initializer] == ["conv.weight", "conv.bias"]
    x = rng.normal(size=(64, 4, 5, 5)).astype(np.float32)
    assert _max_rel(_run(proto, x, "x"), _run(model, x, "x")) <= 1e-5


def test_activation_producer_is_skipped_with_its_reason():
    relu = helper.make_node("Relu", ["x"], ["z"], name="act")
    proto, report = fold_onnx_batchnorm(_bn_graph(relu, [], ["N", 3, 4], ["N", 3, 4]))
    assert report.skipped == [("bn", "no foldable producer (its input comes from Relu `act`)")]
    assert _ops(proto) == ["Relu", "BatchNormalization"]


class Branchy(nn.Module):
    """Convs and BNs on both sides of a data-dependent branch: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        positive = x.mean() > 0
        x = torch.relu(self.bn(self.stem(x)))
        x = self.a(x) if positive else self.b(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_untraceable_model_folds_along_the_traced_branch(tmp_path):
    torch.manual_seed(0)
    model = far_from_defaults(Branchy())
    with pytest.raises(ModelError, match="torch.fx cannot trace Branchy"):
        fold_batchnorm(model, torch.randn(2, 3, 8, 8))
    big = torch.randn(64, 3, 8, 8) + 3  # takes branch `a`
    path = tmp_path / "m.onnx"
    with pytest.warns(torch.jit.TracerWarning):
        report = export_folded_onnx_fallback(model, path, big[:2])
    assert report.folded == [("bn", "stem"), ("a.1", "a.0")] and not report.skipped
    proto = onnx.load(str(path))
    assert "BatchNormalization" not in _ops(proto) and not any(t.name.startswith("b.") for t in proto.graph.initializer)
    parity = onnx_parity(path, model, [big.numpy()])  # against the original eval-mode model
    assert parity.images == 64 and parity.max_rel <= 1e-5
    # inputs that take the other branch do not match: the parity check is what catches it
    small = torch.randn(64, 3, 8, 8) - 3
    assert onnx_parity(path, model, [small.numpy()]).max_rel > 1e-3


def test_untraceable_zoo_model_folds():
    model = far_from_defaults(Untraceable())
    x = torch.rand(64, 4, 6, 6)  # positive sum: the conv-bn branch
    with pytest.warns(torch.jit.TracerWarning):
        proto, report = fold_onnx_batchnorm(export_bn_onnx(model, x[:2]))
    assert report.folded == [("bn", "conv")] and _ops(proto) == ["Conv"]
    with torch.no_grad():
        assert _max_rel(_run(proto, x.numpy()), model(x).numpy()) <= 1e-5


def test_builtin_model_graph_equals_the_fx_folded_export(tmp_path):
    model = load_model("builtin:small_resnet").model
    x = torch.randn(64, 3, 32, 32)
    proto, report = fold_onnx_batchnorm(export_bn_onnx(model, x[:2]))
    assert len(report.folded) == 9 and not report.skipped
    fx_model, fx_report = fold_batchnorm(model, x[:2])
    assert report.folded == fx_report.folded
    export_onnx(fx_model, tmp_path / "fx.onnx", x[:2], check_batches=[x.numpy()])
    fx = onnx.load(str(tmp_path / "fx.onnx"))
    assert _ops(proto) == _ops(fx)
    assert [list(n.attribute) for n in proto.graph.node] == [list(n.attribute) for n in fx.graph.node]
    assert [t.name for t in proto.graph.initializer] == [t.name for t in fx.graph.initializer]
    for a, b in zip(proto.graph.initializer, fx.graph.initializer, strict=True):  # one maths: the same bits
        assert np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b)), a.name
    with torch.no_grad():
        ref = model(x).numpy()
    got = _run(proto, x.numpy())
    assert _max_rel(got, ref) <= 1e-5 and np.array_equal(got.argmax(1), ref.argmax(1))
