"""Export stage: adapted checkpoint -> folded ONNX / TensorRT engine (see docs/design.md, docs/folding.md)."""

__all__: list[str] = []
