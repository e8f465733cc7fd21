"""Optional heavy dependencies, imported on first use with the project's error naming what to install.
Imports nothing heavy itself (the runtime uses it on machines without torch)."""

from __future__ import annotations

from types import ModuleType

from gprebn_edge.errors import MissingDependencyError

__all__ = ["TRT_INSTALL_FIX", "import_tensorrt"]

TRT_INSTALL_FIX = ("TensorRT is not installed: pip install 'gprebn-edge[trt]' (on a Jetson, JetPack's "
                   "python3-libnvinfer in a venv made with --system-site-packages)")


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or MissingDependencyError saying how to install it. Only 10.x is accepted:
    TensorRT 11 drops the FP16/INT8 builder flags the export relies on."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not
        raise MissingDependencyError(TRT_INSTALL_FIX) from e
    version = getattr(tensorrt, "__version__", None)
    if version is None:  # e.g. tensorrt-stubs alone: an empty package
        raise MissingDependencyError(TRT_INSTALL_FIX)
    if version.split(".")[0] != "10":
        raise MissingDependencyError(f"TensorRT {version} is installed, but gprebn-edge supports TensorRT 10.x only "
                                     f"(TensorRT 11 drops the FP16/INT8 builder flags): pip install 'tensorrt>=10,<11'")
    if not hasattr(tensorrt, "Runtime"):
        raise MissingDependencyError(TRT_INSTALL_FIX)
    return tensorrt
