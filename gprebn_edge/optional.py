"""Optional heavy dependencies, imported on first use with the project's error naming what to install.
Imports nothing heavy itself (the runtime uses it on machines without torch)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from gprebn_edge.errors import MissingDependencyError

__all__ = ["TRT_INSTALL_FIX", "TRT_MAJORS", "import_polygraphy", "import_tensorrt", "new_figure", "save_figure"]

TRT_INSTALL_FIX = ("TensorRT is not installed: pip install 'gprebn-edge[trt]' (on a Jetson, JetPack's "
                   "python3-libnvinfer in a venv made with --system-site-packages)")


TRT_MAJORS = ("10", "11")  # strongly typed builds only, so both work (JetPack 6 has 10.x; PyPI serves 11.x)


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or MissingDependencyError saying how to install it. 10.x and 11.x are accepted:
    precision is in the ONNX file and engines are built strongly typed, which both support."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not
        raise MissingDependencyError(TRT_INSTALL_FIX) from e
    version = getattr(tensorrt, "__version__", None)
    if version is None:  # e.g. tensorrt-stubs alone: an empty package
        raise MissingDependencyError(TRT_INSTALL_FIX)
    if version.split(".")[0] not in TRT_MAJORS:
        raise MissingDependencyError(f"TensorRT {version} is installed, but gprebn-edge supports TensorRT 10.x and "
                                     "11.x (strongly typed builds): pip install 'gprebn-edge[trt]'")
    if not hasattr(tensorrt, "Runtime"):
        raise MissingDependencyError(TRT_INSTALL_FIX)
    return tensorrt


def import_polygraphy() -> ModuleType:
    """The `polygraphy` module (NVIDIA's, pure Python: the TensorRT build and runner go through it), or
    MissingDependencyError naming the `trt` extra."""
    try:
        import polygraphy
    except ImportError:
        raise MissingDependencyError("Polygraphy is not installed: pip install 'gprebn-edge[trt]' (or pip install "
                                     "polygraphy)") from None
    return polygraphy


def new_figure(figsize: tuple[float, float]) -> Any:
    """A bare matplotlib Figure (no pyplot: no global state, safe from a worker thread, never a window), or
    MissingDependencyError naming the `plot` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("plots need matplotlib: pip install 'gprebn-edge[plot]'") from None
    return Figure(figsize=figsize)


def save_figure(figure: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write `figure` as PNG to `path` atomically."""
    from gprebn_edge.io import atomic_path

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)  # the temporary name ends in .tmp: say the format
    return Path(path)
