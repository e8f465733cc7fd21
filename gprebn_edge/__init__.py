"""gprebn-edge: GpreBN test-time batch-norm adaptation, folding and export for edge GPUs.

The public API (docs/api.md) is what `__all__` names. It is imported on first use, so `import gprebn_edge`
imports neither torch nor onnxruntime, and the serving part (`open_runner`, `compare` of exports,
`AdaptiveLoop` without `model=`) works without PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "adapt", "export_onnx", "open_runner", "compare", "AdaptiveLoop", "AdaptReport",
           "ExportReport", "Predictions", "LoopStatus", "LoopResult", "CompareResult", "GprebnError"]

if TYPE_CHECKING:
    from gprebn_edge.api import (
        AdaptiveLoop,
        AdaptReport,
        CompareResult,
        ExportReport,
        GprebnError,
        LoopResult,
        LoopStatus,
        Predictions,
        adapt,
        compare,
        export_onnx,
        open_runner,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gprebn_edge import api

        return getattr(api, name)
    raise AttributeError(f"module 'gprebn_edge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
