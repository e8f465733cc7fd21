"""Precision lives in the ONNX file: a float16 ONNX (float32 inputs and outputs kept) and an int8 Q/DQ ONNX,
each made from the folded float32 ONNX by a maintained tool and checked against PyTorch fp32 with
onnxruntime on the CPU, like the float32 export, with floors of their own.

- fp16: onnxconverter-common's `convert_float_to_float16(keep_io_types=True)`. TensorRT's 10->11 migration
  guide names ModelOpt AutoCast; its ONNX extra pulls onnxruntime-gpu and cupy (CUDA wheels) and itself
  depends on onnxconverter-common, so the converter is used directly (the `precision` extra).
- int8: onnxruntime's `quantize_static` in QDQ format, calibrated on the site's images (MinMax), with
  symmetric activations and weights (TensorRT takes zero points of 0 only) and per-channel weights. Operators
  the quantizer has no int8 rule for stay in float; `kept_float` names them.

TensorRT then builds what the file says (strongly typed): see tensorrt_build."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.errors import GprebnError, InputError, MissingDependencyError

__all__ = ["PRECISIONS", "MIN_INT8_IMAGES", "FLOORS", "Floor", "PrecisionBelowFloor", "onnx_precision",
           "to_fp16", "to_int8", "check_floor"]

PRECISIONS = ("fp32", "fp16", "int8")
MIN_INT8_IMAGES = 64  # fewer calibration images than this give activation ranges of a few scenes


@dataclass(frozen=True)
class Floor:
    """The least an fp16 or int8 file must keep of PyTorch fp32's answers on the check images."""

    top1_agreement: float
    max_rel: float


# Measured (benchmarks/results/precision.md): fp16 flips the top-1 class only where the two best logits nearly
# tie (built-in model 0.2 %, EfficientNet-Lite0 on the walk-through photos ~1 %); int8 costs more.
FLOORS = {"fp16": Floor(top1_agreement=0.98, max_rel=2e-2), "int8": Floor(top1_agreement=0.90, max_rel=0.35)}


class PrecisionBelowFloor(GprebnError):
    """A reduced-precision file was written, but its parity is below the floor: reported as a failure."""


def onnx_precision(proto: Any) -> str:
    """"int8" for a graph with QuantizeLinear nodes, "fp16" for one with float16 initializers, else "fp32"."""
    from onnx import TensorProto

    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        return "int8"
    if any(t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer):
        return "fp16"
    return "fp32"


def to_fp16(src: Path, out: Path) -> int:
    """Write the float16 form of the float32 ONNX `src` to `out`; inputs and outputs stay float32. Returns
    how many weights the converter moved into float16's range (tiny ones to 1e-7, huge ones to 1e4); it
    warns once per value, which would flood the terminal, so the warnings are counted instead."""
    import onnx

    try:
        from onnxconverter_common.float16 import convert_float_to_float16
    except ImportError:
        raise MissingDependencyError("--fp16 needs onnxconverter-common: pip install 'gprebn-edge[precision]'") \
            from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        proto = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return sum("truncated" in str(w.message) for w in caught)


class _Feed:
    """onnxruntime's CalibrationDataReader protocol over float32 NCHW batches."""

    def __init__(self, batches: Sequence[np.ndarray], name: str) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter([{name: np.ascontiguousarray(b, np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:  # newer onnxruntime iterates the reader
        return self._it


def to_int8(src: Path, out: Path, batches: Sequence[np.ndarray], input_name: str = "input") -> dict[str, int]:
    """Write a Q/DQ int8 form of `src` to `out`, calibrated on `batches` (at least
    MIN_INT8_IMAGES images). Returns the operator types left in float, with their counts."""
    images = sum(len(b) for b in batches)
    if images < MIN_INT8_IMAGES:
        raise InputError(f"--int8 needs at least {MIN_INT8_IMAGES} calibration images from the site (--data), got "
                         f"{images}")
    import onnx

    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static
        from onnxruntime.quantization.registry import QDQRegistry
    except ImportError as e:
        raise MissingDependencyError(f"--int8 needs onnxruntime's quantization tools ({e}): pip install "
                                     "onnxruntime") from None
    quiet = logging.getLogger()  # the quantizer's advice goes to the root logger
    level = quiet.level
    with tempfile.TemporaryDirectory(prefix="gprebn-int8-") as tmp:
        shaped = Path(tmp) / "shaped.onnx"
        quant_pre_process(str(src), str(shaped), skip_optimization=True)  # shape inference; names kept
        try:
            quiet.setLevel(logging.ERROR)
            quantize_static(str(shaped), str(out), _Feed(batches, input_name),  # type: ignore[arg-type]
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                           "QDQKeepRemovableActivations": True})
        finally:
            quiet.setLevel(level)
    onnx.checker.check_model(str(out))
    return _float_compute(onnx.load(str(src)), set(QDQRegistry))


def _float_compute(proto: Any, quantizable: set[str]) -> dict[str, int]:
    """Operator types (with counts) that compute on float tensors and have no int8 rule in `quantizable`:
    the ones left in float. Constants and shape arithmetic (int64) are not counted."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    ops = Counter(n.op_type for n in proto.graph.node if n.op_type not in quantizable and n.op_type != "Constant"
                  and any(types.get(o) in floats for o in n.output))
    return dict(sorted(ops.items()))


def check_floor(precision: str, top1_agreement: float, max_rel: float, out: Path) -> None:
    """PrecisionBelowFloor, naming the kept file, where fp16/int8 parity is below FLOORS[precision]."""
    floor = FLOORS[precision]
    if top1_agreement >= floor.top1_agreement and max_rel <= floor.max_rel:
        return
    raise PrecisionBelowFloor(
        f"the {precision} ONNX is below its floor: top-1 agreement with PyTorch fp32 {100 * top1_agreement:.2f} % "
        f"(floor {100 * floor.top1_agreement:.0f} %), max relative logit error {max_rel:.2e} (floor "
        f"{floor.max_rel:g}); the file was kept for inspection at {out} (its manifest records the figures): "
        "do not deploy it; export fp32, or fp16 instead of int8")
