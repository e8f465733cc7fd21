"""TensorRT engines: everything that runs without TensorRT (the missing-dependency path, batch ranges,
calibration re-chunking, refit weights from the folded ONNX), and, marked `trt`, builds, runs and refits on a
GPU against onnxruntime. The `trt` tests skip unless a real TensorRT 10 imports and torch sees a CUDA GPU."""

import copy
import subprocess
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gprebn_edge.data.sources import collect, open_source
from gprebn_edge.errors import GprebnError, InputError, MissingDependencyError
from gprebn_edge.export.fold import fold_batchnorm
from gprebn_edge.export.onnx_export import export_onnx
from gprebn_edge.export.tensorrt_build import (
    TRT_INSTALL_FIX,
    ErrorLog,
    build_engine,
    folded_weights,
    import_tensorrt,
    parse_batch_range,
    rechunk_batches,
    refit_engine,
    refit_engine_file,
    trt_logger,
)
from gprebn_edge.models.spec import load_model
from gprebn_edge.models.weights import sha256_file


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
def onnx_b(builtin, images, tmp_path_factory):
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
    path = tmp_path_factory.mktemp("b") / "b.onnx"
    return _export(model, images, path), path


# -- without TensorRT --------------------------------------------------------------------------------------------

@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises, installed or not


def test_import_tensorrt_says_how_to_install(no_tensorrt):
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[trt\]") as e:
        import_tensorrt()
    assert str(e.value) == TRT_INSTALL_FIX and "\n" not in str(e.value)


@pytest.mark.parametrize("version", [None, "8.6.1", "11.0.0"])
def test_import_tensorrt_refuses_stub_only_and_other_majors(monkeypatch, version):
    fake = types.ModuleType("tensorrt")  # None: what tensorrt-stubs alone leaves, an empty namespace package
    if version is not None:
        fake.__version__ = version
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[trt\]" if version is None else "10.x"):
        import_tensorrt()


def test_module_imports_without_tensorrt():
    code = "import sys, gprebn_edge.export.tensorrt_build; assert 'tensorrt' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_engine_without_tensorrt_writes_nothing(no_tensorrt, onnx_a, tmp_path):
    _, onnx_path = onnx_a
    engine = tmp_path / "m.engine"
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[trt\]"):
        build_engine(onnx_path, engine, precision="fp16", batch=(1, 8, 32), timing_cache=tmp_path / "t.cache")
    assert list(tmp_path.iterdir()) == []  # no engine, no cache, no temporary file


def test_refit_without_tensorrt(no_tensorrt, tmp_path):
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[trt\]"):
        refit_engine(b"not an engine", {})


def test_build_engine_checks_arguments_first(onnx_a, tmp_path):
    _, onnx_path = onnx_a
    with pytest.raises(InputError, match="fp32, fp16, int8"):
        build_engine(onnx_path, tmp_path / "m.engine", precision="int4")
    with pytest.raises(InputError, match="MIN:OPT:MAX"):
        build_engine(onnx_path, tmp_path / "m.engine", batch=(8, 4, 32))
    with pytest.raises(InputError, match="calibration"):
        build_engine(onnx_path, tmp_path / "m.engine", precision="int8")
    with pytest.raises(GprebnError, match="no such ONNX"):
        build_engine(tmp_path / "none.onnx", tmp_path / "m.engine")
    with pytest.raises(GprebnError, match="existing folder"):
        build_engine(onnx_path, tmp_path / "nope" / "m.engine")
    assert list(tmp_path.iterdir()) == []


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


def _rows(sizes, dtype=np.float64):
    """Batches whose rows are numbered 0, 1, 2, ... across batches (every value of row i is i)."""
    out, start = [], 0
    for n in sizes:
        out.append(np.broadcast_to(np.arange(start, start + n, dtype=dtype)[:, None, None, None], (n, 3, 2, 2)))
        start += n
    return out


def test_rechunk_exact_batches_in_order():
    chunks = list(rechunk_batches(_rows([3, 5, 2, 7]), 4))  # 17 rows -> 4 full batches, 1 row dropped
    assert [len(c) for c in chunks] == [4, 4, 4, 4]
    assert np.array_equal(np.concatenate(chunks)[:, 0, 0, 0], np.arange(16))
    for c in chunks:
        assert c.dtype == np.float32 and c.flags.c_contiguous and c.shape[1:] == (3, 2, 2)


def test_rechunk_keeps_the_last_partial_batch_on_request():
    chunks = list(rechunk_batches(_rows([3, 5, 2, 7]), 4, drop_last=False))
    assert [len(c) for c in chunks] == [4, 4, 4, 4, 1] and chunks[-1][0, 0, 0, 0] == 16
    assert list(rechunk_batches(_rows([3]), 4)) == []
    assert [len(c) for c in rechunk_batches(_rows([3]), 4, drop_last=False)] == [3]


def test_rechunk_large_batches_and_non_contiguous_input():
    big = np.asfortranarray(np.random.default_rng(0).normal(size=(10, 3, 4, 4)).astype(np.float16))
    chunks = list(rechunk_batches([big], 3))
    assert [len(c) for c in chunks] == [3, 3, 3]
    assert all(c.dtype == np.float32 and c.flags.c_contiguous for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), big[:9].astype(np.float32))


def test_rechunk_rejects_bad_batches():
    with pytest.raises(InputError, match="float"):
        list(rechunk_batches([np.zeros((2, 3, 4, 4), dtype=np.int64)], 2))
    with pytest.raises(InputError, match="differ in shape"):
        list(rechunk_batches([np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 5, 5))], 2))
    with pytest.raises(InputError, match=">= 1"):
        list(rechunk_batches([], 0))


def test_error_log_keeps_recent_errors_on_one_line():
    log = ErrorLog(keep=4)
    log.add("old")
    mark = log.mark()
    assert log.since(mark) == "no error message from TensorRT"
    for i in range(6):
        log.add(f"error {i}\n  detail")
    assert log.since(mark) == "error 3 detail; error 4 detail; error 5 detail"
    assert log.since(mark, last=1) == "error 5 detail"


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


# -- with TensorRT and a CUDA GPU ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trt():
    module = pytest.importorskip("tensorrt")
    if getattr(module, "__version__", None) is None:
        pytest.skip("only the tensorrt type stubs are installed")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (and torch with CUDA)")
    return module


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def _run(engine_bytes, x):
    """Logits of the serialized engine on `x`, with device memory from torch."""
    import tensorrt as trt

    runtime = trt.Runtime(trt_logger())  # must outlive the engine
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    assert engine is not None
    context = engine.create_execution_context()
    inp = torch.from_numpy(np.ascontiguousarray(x)).cuda()
    assert context.set_input_shape("input", tuple(x.shape))
    out = torch.empty(tuple(context.get_tensor_shape("logits")), dtype=torch.float32, device="cuda")
    context.set_tensor_address("input", inp.data_ptr())
    context.set_tensor_address("logits", out.data_ptr())
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return out.cpu().numpy()


def _max_rel(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def refittable_a(trt, onnx_a, tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "a.engine"
    info = build_engine(onnx_a[1], path, batch=(1, 8, 16), refittable=True)
    return path, info


@pytest.mark.trt
def test_fp32_engine_matches_onnxruntime(trt, onnx_a, images, tmp_path):
    engine, cache = tmp_path / "a.engine", tmp_path / "timing.cache"
    phases = []
    info = build_engine(onnx_a[1], engine, batch=(1, 4, 8), timing_cache=cache, progress=phases.append)
    assert engine.is_file() and cache.is_file() and phases
    assert info["engine_sha256"] == sha256_file(engine) and info["tensorrt"].startswith("10.")
    assert info["precision"] == "fp32" and info["batch"] == {"min": 1, "opt": 4, "max": 8}
    assert info["inputs"] == [{"name": "input", "shape": [-1, 3, 32, 32]}]
    assert info["outputs"] == [{"name": "logits", "shape": [-1, 10]}]
    assert info["gpu"] and info["compute_capability"] and info["refittable"] is False
    assert info["timing_cache"] == {"path": str(cache), "reused": False}
    for x in (images[:1], images[:5], images[8:16]):  # every batch size in the profile
        assert _max_rel(_run(engine.read_bytes(), x), _ort(onnx_a[1], x)) <= 1e-3  # TF32 is on by default
    again = build_engine(onnx_a[1], tmp_path / "again.engine", batch=(1, 4, 8), timing_cache=cache)
    assert again["timing_cache"]["reused"] is True


@pytest.mark.trt
def test_refit_swaps_in_the_other_models_weights(refittable_a, onnx_a, onnx_b, images):
    path, info = refittable_a
    assert info["refittable"] is True
    original = path.read_bytes()
    x = images[:8]
    ref_a, ref_b = _ort(onnx_a[1], x), _ort(onnx_b[1], x)
    assert _max_rel(ref_a, ref_b) > 0.05  # the two models really differ
    refitted = refit_engine(original, folded_weights(onnx_b[1]))
    assert _max_rel(_run(refitted, x), ref_b) <= 1e-3
    assert _max_rel(_run(original, x), ref_a) <= 1e-3  # the input bytes are untouched
    back = refit_engine(refitted, folded_weights(onnx_a[1]))
    assert _max_rel(_run(back, x), ref_a) <= 1e-3


@pytest.mark.trt
def test_refit_refuses_missing_unknown_and_misshapen_weights(refittable_a, onnx_a, onnx_b, images):
    path, _ = refittable_a
    original = path.read_bytes()
    weights = folded_weights(onnx_b[1])
    partial = {k: v for k, v in weights.items() if k != "layers.1.0.conv2.bias"}
    with pytest.raises(GprebnError, match="layers.1.0.conv2.bias"):
        refit_engine(original, partial)
    with pytest.raises(GprebnError, match="no refittable weights named bogus"):
        refit_engine(original, {**weights, "bogus": np.zeros(3, np.float32)})
    with pytest.raises(GprebnError, match="fc.bias"):
        refit_engine(original, {**weights, "fc.bias": np.zeros(11, np.float32)})
    with pytest.raises(GprebnError, match="fc.bias"):
        refit_engine(original, {**weights, "fc.bias": weights["fc.bias"].astype(np.float64)})
    assert path.read_bytes() == original
    x = images[:4]
    assert _max_rel(_run(original, x), _ort(onnx_a[1], x)) <= 1e-3  # still usable, still model A


@pytest.mark.trt
def test_refit_engine_file(refittable_a, onnx_b, images, tmp_path):
    path, _ = refittable_a
    copy_path = tmp_path / "a.engine"
    copy_path.write_bytes(path.read_bytes())
    out = refit_engine_file(copy_path, folded_weights(onnx_b[1]), tmp_path / "b.engine")
    assert out == tmp_path / "b.engine" and copy_path.read_bytes() == path.read_bytes()
    with pytest.raises(GprebnError):
        refit_engine_file(copy_path, {"bogus": np.zeros(1, np.float32)})
    assert copy_path.read_bytes() == path.read_bytes()  # failed in-place refit: the file is unchanged
    refit_engine_file(copy_path, folded_weights(onnx_b[1]))
    x = images[:4]
    assert _max_rel(_run(copy_path.read_bytes(), x), _ort(onnx_b[1], x)) <= 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.engine", "b.engine"]


@pytest.mark.trt
def test_refit_needs_a_refittable_engine(trt, onnx_a, onnx_b, tmp_path):
    build_engine(onnx_a[1], tmp_path / "fixed.engine", batch=(1, 1, 2))
    with pytest.raises(GprebnError, match="without REFIT"):
        refit_engine((tmp_path / "fixed.engine").read_bytes(), folded_weights(onnx_b[1]))


@pytest.mark.trt
def test_int8_engine_calibrates_and_caches(trt, onnx_a, images, tmp_path):
    if not trt.Builder(trt_logger()).platform_has_fast_int8:
        pytest.skip("no fast int8 on this GPU")
    cache = tmp_path / "calib.cache"
    batches = [images[i:i + 5] for i in range(0, 64, 5)]  # uneven: re-cut to 8-image batches
    info = build_engine(onnx_a[1], tmp_path / "q.engine", precision="int8", batch=(1, 8, 16),
                        calibration=batches, calibration_cache=cache)
    assert info["int8_calibration"]["batches"] == 8 and cache.is_file()
    got, ref = _run((tmp_path / "q.engine").read_bytes(), images), _ort(onnx_a[1], images)
    assert np.isfinite(got).all() and (got.argmax(1) == ref.argmax(1)).mean() >= 0.75
    again = build_engine(onnx_a[1], tmp_path / "q2.engine", precision="int8", batch=(1, 8, 16),
                         calibration_cache=cache)  # from the cache alone, no data
    assert again["int8_calibration"]["batches"] == 0
