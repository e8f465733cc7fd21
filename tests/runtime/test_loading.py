"""open_runner picks the backend by suffix and refuses what it cannot run in one line; model_metadata reads
the preprocessing and class count that travel with each kind of model file."""

import shutil

import pytest

from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.errors import ArtifactError, InputError
from gprebn_edge.runtime.loading import backend_for, model_metadata, open_runner
from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner
from gprebn_edge.runtime.torch_runner import TorchRunner
from gprebn_edge.runtime.trt_runner import TensorRTRunner
from gprebn_edge.stages import CHECKPOINTS


def test_backend_by_suffix(exported, tmp_path):
    onnx_runner = open_runner(exported.onnx, threads=1)
    assert isinstance(onnx_runner, OnnxRuntimeRunner) and onnx_runner.providers == ("cpu",)
    assert isinstance(open_runner(exported.checkpoint, checkpoints=CHECKPOINTS), TorchRunner)
    for suffix in (".engine", ".plan", ".trt", ".ENGINE"):
        engine = tmp_path / f"m{suffix}"
        engine.write_bytes(b"x")
        runner = open_runner(engine)
        assert isinstance(runner, TensorRTRunner) and runner.device_id == 0
        with pytest.raises(InputError, match="CUDA graphs are not offered with TensorRT"):
            open_runner(engine, cuda_graphs=True)  # Polygraphy's runner has none
    assert backend_for(exported.onnx, "torch") == "torch"  # an explicit backend wins
    with open_runner(exported.onnx) as runner:
        assert runner.infer(exported.images[:2]).shape == (2, 10)


def test_devices_map_to_each_backend(exported, tmp_path):
    assert open_runner(exported.onnx, device="cuda:1").providers == ("cuda",)
    r = open_runner(exported.onnx, device="cuda", providers=("tensorrt", "cuda"), fp16=True)
    assert r.providers == ("tensorrt", "cuda") and r.fp16
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    assert open_runner(engine, device="cuda:2").device_id == 2


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model", "weights.bin"])
def test_unknown_suffix_says_what_is_accepted(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"x")
    with pytest.raises(InputError) as e:
        open_runner(path)
    msg = str(e.value)
    assert "\n" not in msg and all(s in msg for s in (".onnx", ".engine", ".safetensors"))


def test_bad_requests(exported, tmp_path):
    with pytest.raises(InputError, match="no such model file.*\\.onnx"):
        open_runner(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="unknown backend"):
        open_runner(exported.onnx, backend="tflite")
    with pytest.raises(InputError, match="CUDA graphs"):
        open_runner(exported.onnx, cuda_graphs=True)
    with pytest.raises(InputError, match="device must be"):
        open_runner(exported.onnx, device="tpu")
    with pytest.raises(InputError, match="onnxruntime settings"):
        open_runner(exported.checkpoint, providers=("cpu",), checkpoints=CHECKPOINTS)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    with pytest.raises(InputError, match="run on the GPU"):
        open_runner(engine, device="cpu")
    with pytest.raises(InputError, match="fixed when it was built"):
        open_runner(engine, fp16=True)


def test_metadata_of_onnx_and_checkpoint(exported):
    onnx_meta = model_metadata(exported.onnx)
    ckpt_meta = model_metadata(exported.checkpoint, CHECKPOINTS)
    with pytest.raises(InputError, match="adapt stage's reader"):
        model_metadata(exported.checkpoint)
    assert onnx_meta["format"] == "onnx" and ckpt_meta["format"] == "checkpoint"
    for meta in (onnx_meta, ckpt_meta):
        assert meta["model"] == "adapted" and meta["num_classes"] == 10
        assert Preprocess.from_dict(meta["preprocess"]) == Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3)
    assert onnx_meta["raw"]["artifact"] == exported.checkpoint.name
    assert ckpt_meta["raw"]["model_spec"]["spec"] == "builtin:small_resnet"


def test_metadata_of_an_engine_comes_from_beside_it(exported, tmp_path):
    engine = tmp_path / "adapted.engine"
    engine.write_bytes(b"x")
    assert model_metadata(engine)["preprocess"] is None
    shutil.copy(exported.onnx, tmp_path / "adapted.onnx")
    meta = model_metadata(engine)
    assert meta["format"] == "engine" and meta["num_classes"] == 10 and meta["preprocess"]["std"] == [0.25] * 3
    manifest = exported.onnx.with_name("adapted.manifest.json")
    shutil.copy(manifest, tmp_path / "adapted.manifest.json")
    meta = model_metadata(engine)
    assert meta["num_classes"] == 10 and meta["raw"]["opset"] >= 17


def test_metadata_of_a_broken_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff" * 100)
    with pytest.raises(ArtifactError, match="is not an ONNX model"):
        model_metadata(bad)
