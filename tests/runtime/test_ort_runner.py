"""OnnxRuntimeRunner on a real export of the built-in model: same logits as onnxruntime itself and as the
folded PyTorch model, its I/O description, provider options and clean failures."""

import numpy as np
import onnxruntime
import pytest
import torch

from gprebn_edge.checkpoint import rebuild_model
from gprebn_edge.errors import ArtifactError, GprebnError, InputError, MissingDependencyError
from gprebn_edge.export.fold import fold_batchnorm
from gprebn_edge.runtime.base import TensorInfo
from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner, parse_providers


def max_rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_logits_equal_onnxruntime_and_folded_pytorch(exported):
    x = exported.images
    with OnnxRuntimeRunner(exported.onnx) as runner:
        got = runner.infer(x)
        one = runner.infer(x[:1])
    direct = onnxruntime.InferenceSession(str(exported.onnx), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got, direct.run(["logits"], {"input": x})[0])
    assert got.dtype == np.float32 and got.shape == (32, 10) and one.shape == (1, 10)

    model, _ = rebuild_model(exported.checkpoint, "adapted")
    folded, report = fold_batchnorm(model, torch.from_numpy(x[:2]))
    assert report.folded and not report.skipped
    with torch.no_grad():
        ref = folded(torch.from_numpy(x)).numpy()
    assert max_rel(got, ref) <= 1e-5
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_io_description_and_info(exported):
    runner = OnnxRuntimeRunner(exported.onnx, threads=1)
    with pytest.raises(InputError, match="with runner"):
        runner.inputs()
    with pytest.raises(GprebnError, match="inside `with runner:`"):
        runner.infer(exported.images)
    with runner:
        assert runner.inputs() == [TensorInfo("input", ("batch", 3, 32, 32), "float32")]
        assert runner.outputs() == [TensorInfo("logits", ("batch", 10), "float32")]
        info = runner.info()
    assert not runner.active
    assert (info.backend, info.device, info.precision) == ("onnxruntime", "cpu", "fp32")
    assert info.details["providers"] == ["CPUExecutionProvider"] and info.details["threads"] == 1


def test_bad_inputs_are_one_line_errors(exported):
    with OnnxRuntimeRunner(exported.onnx) as runner:
        # checked before onnxruntime sees it: the model, the tensor and what to give, on one line
        with pytest.raises(InputError, match=r"adapted.onnx \(onnxruntime\): input 'input' is \[batch, 3, 32, 32\], "
                           r"got shape \[2, 3, 16, 16\]: preprocess the images to batch, 3, 32, 32") as e:
            runner.infer(np.zeros((2, 3, 16, 16), np.float32))
        assert "\n" not in str(e.value)
        with pytest.raises(InputError, match=r"is 4-d \[batch, 3, 32, 32\], got shape \[3, 32, 32\]"):
            runner.infer(np.zeros((3, 32, 32), np.float32))
        # float64 and non-contiguous batches are converted, not refused
        x = np.asfortranarray(exported.images[:2].astype(np.float64))
        np.testing.assert_allclose(runner.infer(x), runner.infer(exported.images[:2]), rtol=1e-6, atol=1e-6)


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf\x00\xff" * 10)
    with pytest.raises(ArtifactError, match="is not an ONNX model") as e:
        OnnxRuntimeRunner(bad).activate()
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    with pytest.raises(InputError, match="no such ONNX file"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx").activate()


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="this onnxruntime has the CUDA provider")
def test_unavailable_provider_names_the_gpu_extra(exported):
    runner = OnnxRuntimeRunner(exported.onnx, providers=("cuda",))
    with pytest.raises(MissingDependencyError, match=r"gprebn-edge\[gpu\]") as e:
        runner.activate()
    assert "CUDAExecutionProvider" in str(e.value) and not runner.active


def test_bad_settings(exported):
    with pytest.raises(InputError, match="unknown onnxruntime provider"):
        OnnxRuntimeRunner(exported.onnx, providers=("rocm",))
    with pytest.raises(InputError, match="threads"):
        OnnxRuntimeRunner(exported.onnx, threads=0)
    with pytest.raises(InputError, match="tensorrt provider"):
        OnnxRuntimeRunner(exported.onnx, fp16=True)


def test_provider_options_reach_onnxruntime(exported, tmp_path, monkeypatch):
    """TensorRT/CUDA options as onnxruntime expects them, checked by recording the session's arguments (the
    session itself then runs on the CPU, since this machine has neither provider)."""
    seen = {}
    real = onnxruntime.InferenceSession

    class Recording:  # a CPU session that reports the providers it was asked for as started
        def __init__(self, path, options, providers):
            seen.update(providers=providers, threads=options.intra_op_num_threads)
            self.session = real(path, options, providers=["CPUExecutionProvider"])
            self.get_providers = lambda: [name for name, _ in providers]

        def __getattr__(self, name):
            return getattr(self.session, name)

    recording_session = Recording

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    cache = tmp_path / "trt-cache"
    runner = OnnxRuntimeRunner(exported.onnx, providers=("tensorrt", "cuda"), threads=2, fp16=True,
                               engine_cache=cache, device_id=1)
    with runner:
        assert runner.infer(exported.images[:2]).shape == (2, 10)
        info = runner.info()
    assert seen["threads"] == 2 and cache.is_dir()
    assert seen["providers"] == [
        ("TensorrtExecutionProvider", {"device_id": 1, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                       "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
                                       "trt_timing_cache_path": str(cache)}),
        ("CUDAExecutionProvider", {"device_id": 1})]
    assert (info.device, info.precision) == ("cuda:1", "fp16")


def test_a_provider_onnxruntime_could_not_start_is_an_error(exported, monkeypatch):
    """onnxruntime-gpu without TensorRT's libraries starts the session without the TensorRT provider and only
    logs it: the runner says so instead of timing the CPU."""
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession",
                        lambda path, options, providers: real(path, options, providers=["CPUExecutionProvider"]))
    runner = OnnxRuntimeRunner(exported.onnx, providers=("tensorrt", "cuda"))
    with pytest.raises(MissingDependencyError, match="could not start TensorrtExecutionProvider, "
                                                     "CUDAExecutionProvider") as e:
        runner.activate()
    assert "\n" not in str(e.value) and not runner.active


def test_parse_providers():
    assert parse_providers("tensorrt, cuda") == ("tensorrt", "cuda") and parse_providers("CPU") == ("cpu",)
    for bad in ("", "rocm", "cuda,,vulkan"):
        with pytest.raises(InputError, match="e.g. tensorrt,cuda"):
            parse_providers(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("providers", [("cuda",), ("tensorrt", "cuda")])
def test_gpu_providers_run_each_precision(exported, tmp_path, providers):
    """The second GPU route on a GPU: fp32, fp16 and Q/DQ int8 files, against PyTorch fp32's onnxruntime CPU
    answer (skipped without onnxruntime-gpu and its providers; NOT run on this project's machines so far)."""
    names = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    missing = [names[p] for p in providers if names[p] not in onnxruntime.get_available_providers()]
    if missing:
        pytest.skip(f"this onnxruntime has no {', '.join(missing)} (onnxruntime-gpu is needed)")
    from gprebn_edge.export.pipeline import export_artifact

    with OnnxRuntimeRunner(exported.onnx) as cpu:
        ref = cpu.infer(exported.images)
    for precision, limit in (("fp32", 5e-3), ("fp16", 2e-2), ("int8", 0.35)):
        path = tmp_path / f"m-{precision}.onnx"
        export_artifact(exported.checkpoint, path, precision=precision, check_images=64,
                        data="synthetic:gaussian_noise:5:n=64")
        try:
            runner = OnnxRuntimeRunner(path, providers=providers, engine_cache=tmp_path / "cache")
            with runner:
                got = runner.infer(exported.images)
        except MissingDependencyError as e:  # e.g. the TensorRT provider without TensorRT's libraries
            pytest.skip(str(e))
        assert max_rel(got, ref) <= limit and (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_spin_false_stops_busy_waiting_threads(exported):
    """compare and the device loop run two sessions (or a session and adaptation) on one CPU: an idle session
    must not busy-wait on the cores the other is timed on."""
    def spinning(runner):
        try:
            return runner._session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except Exception:  # not set: onnxruntime's default, which spins
            return "default"

    with OnnxRuntimeRunner(exported.onnx, spin=False) as quiet, OnnxRuntimeRunner(exported.onnx) as busy:
        assert spinning(quiet) == "0" and spinning(busy) != "0"


def test_an_installed_onnxruntime_that_fails_to_import_is_not_called_missing(monkeypatch):
    import builtins

    from gprebn_edge.errors import MissingDependencyError
    from gprebn_edge.runtime.ort_runner import import_onnxruntime

    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("initialization failed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing)
    with pytest.raises(MissingDependencyError, match="installed but failed to import .initialization failed"):
        import_onnxruntime()
