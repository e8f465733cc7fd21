"""TensorRTRunner (Polygraphy's TrtRunner behind our Runner interface): a clear error without TensorRT or
Polygraphy (runs everywhere); engine parity, shape profiles and foreign engines where TensorRT and a GPU are
present (marked trt, skipped otherwise: NOT run on this project's machines so far)."""

import re
import sys

import numpy as np
import pytest

from gprebn_edge.errors import ArtifactError, InputError, MissingDependencyError
from gprebn_edge.optional import import_polygraphy, import_tensorrt
from gprebn_edge.runtime.loading import open_runner
from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner
from gprebn_edge.runtime.trt_runner import TensorRTRunner


def test_missing_tensorrt_names_the_extra(tmp_path, monkeypatch):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    for runner in (TensorRTRunner(engine), open_runner(engine)):  # building a runner needs no TensorRT
        assert isinstance(runner, TensorRTRunner)
        with pytest.raises(MissingDependencyError, match=r"pip install 'gprebn-edge\[trt\]'") as e:
            runner.activate()
        assert "JetPack" in str(e.value) and "\n" not in str(e.value) and not runner.active


def test_type_stubs_alone_are_not_tensorrt(tmp_path, monkeypatch):
    """`pip install tensorrt-stubs` leaves an importable, empty `tensorrt` namespace package."""
    stubs = tmp_path / "site" / "tensorrt"
    stubs.mkdir(parents=True)
    (stubs / "__init__.pyi").write_text("class Runtime: ...\n")
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    if hasattr(__import__("tensorrt"), "Runtime"):
        pytest.skip("a real TensorRT is installed ahead of the fake one")
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[trt\]"):
        import_tensorrt()


def test_no_cuda_graphs(tmp_path):
    with pytest.raises(InputError, match="CUDA graphs are not offered with TensorRT"):
        TensorRTRunner(tmp_path / "x.engine", cuda_graph=True)


# -- on a machine with TensorRT and a GPU -------------------------------------------------------------
MAX_BATCH = 8


@pytest.fixture(scope="module")
def engine(exported, tmp_path_factory):
    """An fp32 engine of the exported ONNX with a batch profile 1..MAX_BATCH (built here, on this GPU)."""
    try:
        import_tensorrt()  # skips also where only TensorRT's type stubs are installed
        import_polygraphy()
    except MissingDependencyError as e:
        pytest.skip(str(e))
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from gprebn_edge.export.tensorrt_build import build_engine

    path = tmp_path_factory.mktemp("trt") / "adapted.engine"
    build_engine(exported.onnx, path, batch=(1, 4, MAX_BATCH))
    return path


@pytest.mark.trt
def test_engine_matches_onnxruntime(exported, engine):
    x = exported.images[:MAX_BATCH]
    with OnnxRuntimeRunner(exported.onnx) as runner:
        ref = runner.infer(x)
    with TensorRTRunner(engine) as runner:
        assert runner.inputs()[0].shape == ("batch", 3, 32, 32)
        assert runner.outputs()[0].name == "logits"
        full = runner.infer(x)
        one = runner.infer(x[:1])      # new shape
        again = runner.infer(x)
        info = runner.info()
    scale = float(np.abs(ref).max())
    # TensorRT may use TF32 for fp32 engines on Ampere and later: allow for it
    for got, want in ((full, ref), (one, ref[:1]), (again, ref)):
        assert got.shape == want.shape and got.dtype == np.float32
        assert float(np.abs(got - want).max()) <= 5e-3 * scale
    assert (full.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert info.backend == "tensorrt" and info.details["io_dtypes"] == {"input": "float32", "logits": "float32"}


@pytest.mark.trt
def test_batch_outside_the_profile(exported, engine):
    with TensorRTRunner(engine) as runner:
        with pytest.raises(InputError, match="was built for input shapes"):
            runner.infer(np.zeros((MAX_BATCH + 1, 3, 32, 32), np.float32))
        assert runner.infer(exported.images[:2]).shape == (2, 10)  # still usable


@pytest.mark.trt
def test_foreign_engine_says_rebuild(engine, tmp_path):
    bad = tmp_path / "other.engine"
    bad.write_bytes(engine.read_bytes()[:64] + b"\x00" * 4096)
    with pytest.raises(ArtifactError, match="specific to the GPU and the TensorRT version") as e:
        TensorRTRunner(bad).activate()
    assert re.search(r"rebuild it on this device with `gprebn-edge export \S+ --trt`", str(e.value))
    assert "\n" not in str(e.value)
