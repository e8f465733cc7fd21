"""Export a (folded) eval-mode model to ONNX and prove it computes what PyTorch computes.

Exporter: the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`): it runs in 0.1 s for the
built-in model, needs no extra package (the dynamo exporter needs onnxscript), and, because BatchNorm is
folded in PyTorch first, its initializers carry our PyTorch parameter names (`layers.0.0.conv1.weight`).
Opset 17, dynamic batch axis, preprocessing and class count in the model metadata, `onnx.checker` clean.
The file is written atomically and only after onnxruntime agrees with PyTorch on real inputs."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gprebn_edge.errors import GprebnError, MissingDependencyError
from gprebn_edge.io import atomic_path

__all__ = ["Parity", "export_onnx", "onnx_parity", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17
INPUT, OUTPUT = "input", "logits"


@dataclass
class Parity:
    """onnxruntime vs PyTorch on the same inputs."""

    images: int
    max_abs: float          # max |logit difference|
    max_rel: float          # max_abs / max |PyTorch logit|
    top1_agreement: float   # fraction of identical argmax

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _session(path: str | Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def onnx_parity(path: str | Path, model: nn.Module, batches: Iterable[np.ndarray]) -> Parity:
    """Run the ONNX file in onnxruntime and the model in PyTorch on each float32 NCHW batch."""
    session = _session(path)
    n = agree = 0
    max_abs = max_ref = 0.0
    for x in batches:
        ref = model(torch.from_numpy(x)).numpy()
        got = session.run([OUTPUT], {INPUT: x})[0]
        max_abs = max(max_abs, float(np.abs(got - ref).max()))
        max_ref = max(max_ref, float(np.abs(ref).max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        n += len(x)
    if n == 0:
        raise GprebnError("no inputs to check ONNX parity on")
    return Parity(images=n, max_abs=max_abs, max_rel=max_abs / max(max_ref, 1e-12), top1_agreement=agree / n)


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor, *,
                check_batches: Iterable[np.ndarray], metadata: dict[str, Any] | None = None,
                opset: int = DEFAULT_OPSET, max_rel: float = 1e-5, min_agreement: float = 1.0) -> Parity:
    """Export `model` (eval mode) to `path`, check it, compare onnxruntime with PyTorch on `check_batches`
    and only then move it into place. Raises GprebnError (and leaves nothing behind) past the tolerances."""
    import onnx

    path = Path(path)
    if path.suffix != ".onnx":
        raise GprebnError(f"ONNX output must end in .onnx, got {path.name}")
    model = model.eval()
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=[OUTPUT], do_constant_folding=True,
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        proto = onnx.load(str(tmp))
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        parity = onnx_parity(tmp, model, check_batches)
        if parity.max_rel > max_rel or parity.top1_agreement < min_agreement:
            raise GprebnError(f"ONNX export does not match PyTorch: max relative logit error {parity.max_rel:.2e} "
                              f"(limit {max_rel:.0e}), top-1 agreement {100 * parity.top1_agreement:.2f} % on "
                              f"{parity.images} images; nothing was written")
    return parity
