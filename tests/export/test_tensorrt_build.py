"""TensorRT engines through Polygraphy: everything that runs without TensorRT (the missing-dependency paths,
batch ranges, the ONNX input check, argument checks before any work, refit weights from the folded ONNX),
and, marked `trt`, strongly typed fp32/fp16/int8 builds and ONNX refits on a GPU against onnxruntime. The
`trt` tests skip unless a real TensorRT 10/11, Polygraphy and a CUDA GPU are present: they have NOT run here."""

import copy
import subprocess
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gprebn_edge.data.sources import collect, open_source
from gprebn_edge.errors import GprebnError, InputError, MissingDependencyError
from gprebn_edge.export.fold import fold_batchnorm
from gprebn_edge.export.onnx_export import export_onnx
from gprebn_edge.export.pipeline import export_model
from gprebn_edge.export.tensorrt_build import (
    build_engine,
    folded_weights,
    parse_batch_range,
    refit_engine,
    refit_engine_file,
)
from gprebn_edge.io import sha256_file
from gprebn_edge.models.spec import load_model
from gprebn_edge.optional import TRT_INSTALL_FIX, import_polygraphy, import_tensorrt


@pytest.fixture(scope="module")
def builtin():
    return load_model("builtin:small_resnet")


@pytest.fixture(scope="module")
def images(builtin):
    return collect(open_source("synthetic:clean:n=64", builtin.preprocess))[0]


def _export(model, images, path):
    example = torch.from_numpy(images[:2])
    folded, _ = fold_batchnorm(model, example)
    export_onnx(folded, path, example, check_batches=[images[:16]])
    return folded


@pytest.fixture(scope="module")
def onnx_a(builtin, images, tmp_path_factory):
    path = tmp_path_factory.mktemp("a") / "a.onnx"
    return _export(builtin.model, images, path), path


@pytest.fixture(scope="module")
def model_b(builtin):
    """The same model with BN statistics and affine parameters moved far: same graph, other weights."""
    model = copy.deepcopy(builtin.model)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean += 0.5 * torch.randn(n, generator=g)
            m.running_var *= 0.5 + torch.rand(n, generator=g)
            m.weight.data *= 0.5 + torch.rand(n, generator=g)
            m.bias.data += 0.2 * torch.randn(n, generator=g)
    return model


@pytest.fixture(scope="module")
def onnx_b(model_b, images, tmp_path_factory):
    path = tmp_path_factory.mktemp("b") / "b.onnx"
    return _export(model_b, images, path), path


# -- without TensorRT --------------------------------------------------------------------------------------------

@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises, installed or not


def test_import_tensorrt_says_how_to_install(no_tensorrt):
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[trt\]") as e:
        import_tensorrt()
    assert str(e.value) == TRT_INSTALL_FIX and "\n" not in str(e.value)


@pytest.mark.parametrize("version", [None, "8.6.1", "12.0.0"])
def test_import_tensorrt_refuses_stub_only_and_other_majors(monkeypatch, version):
    fake = types.ModuleType("tensorrt")  # None: what tensorrt-stubs alone leaves, an empty namespace package
    if version is not None:
        fake.__version__ = version
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[trt\]" if version is None else "10.x and 11.x"):
        import_tensorrt()


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0.106"])
def test_import_tensorrt_takes_10_and_11(monkeypatch, version):
    fake = types.ModuleType("tensorrt")
    fake.__version__, fake.Runtime = version, object
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert import_tensorrt() is fake


def test_missing_polygraphy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[trt\]"):
        import_polygraphy()


def test_module_imports_without_tensorrt():
    code = ("import sys, gprebn_edge.export.tensorrt_build, gprebn_edge.runtime.trt_runner; "
            "assert 'tensorrt' not in sys.modules and 'polygraphy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_engine_without_tensorrt_writes_nothing(no_tensorrt, onnx_a, tmp_path):
    _, onnx_path = onnx_a
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[trt\]"):
        build_engine(onnx_path, tmp_path / "m.engine", batch=(1, 8, 32), timing_cache=tmp_path / "t.cache")
    assert list(tmp_path.iterdir()) == []  # no engine, no cache, no temporary file


def test_refit_without_tensorrt(no_tensorrt, onnx_a, tmp_path):
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[trt\]"):
        refit_engine(b"not an engine", onnx_a[1])
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    with pytest.raises(MissingDependencyError):
        refit_engine_file(engine, onnx_a[1])
    assert engine.read_bytes() == b"x"


def test_build_engine_checks_arguments_first(onnx_a, tmp_path):
    _, onnx_path = onnx_a
    with pytest.raises(InputError, match="MIN:OPT:MAX"):
        build_engine(onnx_path, tmp_path / "m.engine", batch=(8, 4, 32))
    with pytest.raises(InputError, match="workspace"):
        build_engine(onnx_path, tmp_path / "m.engine", workspace_mb=0)
    with pytest.raises(GprebnError, match="no such ONNX"):
        build_engine(tmp_path / "none.onnx", tmp_path / "m.engine")
    with pytest.raises(GprebnError, match="existing folder"):
        build_engine(onnx_path, tmp_path / "nope" / "m.engine")
    assert list(tmp_path.iterdir()) == []


def test_build_engine_needs_a_dynamic_batch(onnx_a, tmp_path):
    proto = onnx.load(str(onnx_a[1]))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # a fixed batch of 4
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))
    with pytest.raises(GprebnError, match="dynamic batch"):
        build_engine(fixed, tmp_path / "m.engine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]


@pytest.mark.parametrize(("text", "expected"), [
    ("1:8:32", (1, 8, 32)), ("4", (4, 4, 4)), (" 2:2:2 ", (2, 2, 2)), ("1:1:64", (1, 1, 64)),
])
def test_parse_batch_range(text, expected):
    assert parse_batch_range(text) == expected


@pytest.mark.parametrize("text", ["", "0:1:2", "8:4:32", "1:8:4", "1:8", "1:8:32:64", "a:b:c", "-1:2:3",
                                  "1.5:2:3", "0", "1::3"])
def test_parse_batch_range_rejects(text):
    with pytest.raises(InputError, match=r"MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX") as e:
        parse_batch_range(text)
    assert "\n" not in str(e.value)


def test_folded_weights_are_the_pytorch_parameters(onnx_a):
    folded, path = onnx_a
    weights = folded_weights(path)
    params = dict(folded.named_parameters())
    assert list(weights) == list(params) and "layers.0.0.conv1.weight" in weights
    for name, p in params.items():
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], p.detach().numpy())


def test_folded_weights_of_a_missing_file(tmp_path):
    with pytest.raises(GprebnError, match="no such ONNX"):
        folded_weights(tmp_path / "none.onnx")


# -- with TensorRT, Polygraphy and a CUDA GPU (not run on this project's machines so far) --------------------------

@pytest.fixture(scope="module")
def trt():
    try:
        module = import_tensorrt()  # skips also where only TensorRT's type stubs are installed
        import_polygraphy()
    except MissingDependencyError as e:
        pytest.skip(str(e))
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (and torch with CUDA)")
    return module


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def _run(engine_bytes, x):
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(engine_bytes)) as runner:
        return runner.infer({"input": x})["logits"]


def _max_rel(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.trt
@pytest.mark.parametrize("precision, limit, agree", [("fp32", 1e-3, 0.99), ("fp16", 2e-2, 0.97),
                                                     ("int8", 0.35, 0.85)])
def test_engine_is_the_onnx_files_precision(trt, builtin, images, tmp_path, precision, limit, agree):
    onnx_path = tmp_path / f"m-{precision}.onnx"
    export_model(builtin.model, {"preprocess": builtin.preprocess.to_dict(), "num_classes": 10}, onnx_path,
                 [images], which="source", precision=precision)
    engine, cache = tmp_path / "m.engine", tmp_path / "timing.cache"
    info = build_engine(onnx_path, engine, batch=(1, 4, 8), timing_cache=cache)
    assert engine.is_file() and cache.is_file() and info["engine_sha256"] == sha256_file(engine)
    assert info["tensorrt"].split(".")[0] in ("10", "11") and info["precision"] == precision
    assert info["strongly_typed"] and info["batch"] == {"min": 1, "opt": 4, "max": 8}
    assert info["timing_cache"] == {"path": str(cache), "reused": False}
    for x in (images[:1], images[:5], images[8:16]):  # every batch size in the profile
        got, ref = _run(engine.read_bytes(), x), _ort(onnx_path, x)
        assert _max_rel(got, ref) <= limit and (got.argmax(1) == ref.argmax(1)).mean() >= agree
    again = build_engine(onnx_path, tmp_path / "again.engine", batch=(1, 4, 8), timing_cache=cache)
    assert again["timing_cache"]["reused"] is True


@pytest.mark.trt
def test_refit_from_the_other_models_onnx(trt, onnx_a, onnx_b, images, tmp_path):
    path = tmp_path / "a.engine"
    assert build_engine(onnx_a[1], path, batch=(1, 8, 16), refittable=True)["refittable"] is True
    original = path.read_bytes()
    x = images[:8]
    ref_a, ref_b = _ort(onnx_a[1], x), _ort(onnx_b[1], x)
    assert _max_rel(ref_a, ref_b) > 0.05  # the two models really differ
    refitted = refit_engine(original, onnx_b[1])
    assert _max_rel(_run(refitted, x), ref_b) <= 1e-3
    assert _max_rel(_run(original, x), ref_a) <= 1e-3  # the input bytes are untouched
    by_name = refit_engine(refitted, folded_weights(onnx_a[1]))  # the device loop's current call
    assert _max_rel(_run(by_name, x), ref_a) <= 1e-3
    out = refit_engine_file(path, onnx_b[1], tmp_path / "b.engine")
    assert out == tmp_path / "b.engine" and path.read_bytes() == original
    with pytest.raises(GprebnError):
        refit_engine(original, {"bogus": np.zeros(1, np.float32)})


@pytest.mark.trt
def test_refit_needs_a_refittable_engine(trt, onnx_a, onnx_b, tmp_path):
    build_engine(onnx_a[1], tmp_path / "fixed.engine", batch=(1, 1, 2))
    with pytest.raises(GprebnError, match="without REFIT"):
        refit_engine((tmp_path / "fixed.engine").read_bytes(), onnx_b[1])
