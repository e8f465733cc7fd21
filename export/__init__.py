"""Export stage: adapted checkpoint -> folded ONNX / TensorRT engine (see DESIGN.md section 5)."""

__all__: list[str] = []
