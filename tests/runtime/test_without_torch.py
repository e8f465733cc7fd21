"""The runtime imports and runs an ONNX model where torch does not exist (a Jetson serving box with only
onnxruntime/TensorRT and numpy): every runtime module imports, open_runner, infer, benchmark, the
environment, the metadata and the plot work, checkpoints fail with a clear message, and nothing even
tries to import torch on the ONNX path."""

import json
import subprocess
import sys
import textwrap

import numpy as np

from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner

SCRIPT = textwrap.dedent("""
    import sys

    attempts = []

    class BlockTorch:
        # a meta-path finder that makes torch and torchvision unimportable, and records who asked
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                attempts.append(name)
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockTorch())

    import importlib
    import json
    import pkgutil

    import numpy as np

    import gprebn_edge.runtime

    modules = sorted(m.name for m in pkgutil.iter_modules(gprebn_edge.runtime.__path__))
    for name in modules:
        importlib.import_module("gprebn_edge.runtime." + name)
    imported = list(attempts)

    from gprebn_edge.errors import MissingDependencyError
    from gprebn_edge.runtime.bench import benchmark, write_json
    from gprebn_edge.runtime.environment import describe_environment
    from gprebn_edge.runtime.latency_plot import plot_latency
    from gprebn_edge.runtime.loading import model_metadata, open_runner

    onnx_path, checkpoint, images, out = sys.argv[1:5]
    x = np.load(images)
    meta = model_metadata(onnx_path)
    with open_runner(onnx_path) as runner:
        logits = runner.infer(x)
    result = benchmark(open_runner(onnx_path), batch=2, warmup=2, iters=10)
    write_json(result, out + "/bench.json")
    plot_latency(result, out + "/bench.png")
    env = describe_environment()
    onnx_attempts = list(attempts)
    try:
        open_runner(checkpoint)
        checkpoint_error = None
    except MissingDependencyError as e:
        checkpoint_error = str(e)
    print(json.dumps({
        "modules": modules, "import_attempts": imported, "onnx_attempts": onnx_attempts,
        "torch_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")),
        "logits": logits.tolist(), "num_classes": meta["num_classes"], "iterations": result.iterations,
        "torch_version": env["versions"]["torch"], "checkpoint_error": checkpoint_error,
    }))
""")


def test_runtime_runs_onnx_without_torch(exported, tmp_path):
    x = exported.images[:4]
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(exported.onnx), str(exported.checkpoint),
                           str(tmp_path / "x.npy"), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"base", "bench", "environment", "latency_plot", "loading", "ort_runner", "torch_runner",
            "trt_runner"} <= set(out["modules"])
    assert out["import_attempts"] == [] and out["onnx_attempts"] == [] and out["torch_modules"] == []
    with OnnxRuntimeRunner(exported.onnx) as runner:
        np.testing.assert_array_equal(np.asarray(out["logits"], np.float32), runner.infer(x))
    assert out["num_classes"] == 10 and out["iterations"] == 10
    assert out["torch_version"]  # read from package metadata, without importing it
    assert "PyTorch is not installed" in out["checkpoint_error"]
    assert json.loads((tmp_path / "bench.json").read_text())["iterations"] == 10
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
