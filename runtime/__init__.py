"""Runtime stage: ONNX / engines -> predictions, latency, comparisons (see docs/design.md).
Imports without torch."""

__all__: list[str] = []
