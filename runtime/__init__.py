"""Runtime stage: ONNX / engines -> predictions, latency, comparisons (see DESIGN.md section 6).
Imports without torch."""

__all__: list[str] = []
