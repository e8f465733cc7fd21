"""Export a (folded) eval-mode model to ONNX and prove it computes what PyTorch computes.

Exporter: the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`): it runs in 0.1 s for the
built-in model, needs no extra package (the dynamo exporter needs onnxscript), and, because BatchNorm is
folded in PyTorch first, its initializers carry our PyTorch parameter names (`layers.0.0.conv1.weight`).
Opset 17, dynamic batch axis, preprocessing and class count in the model metadata, `onnx.checker` clean.
The file is written atomically and only after onnxruntime agrees with PyTorch on real inputs."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gprebn_edge.errors import GprebnError
from gprebn_edge.io import atomic_path, strict_json

__all__ = ["Parity", "export_onnx", "onnx_parity", "fp32_noise", "parity_limit", "DEFAULT_OPSET", "DEFAULT_MAX_REL",
           "drop_initializer_inputs", "Exporter"]

DEFAULT_OPSET = 17
DEFAULT_MAX_REL = 1e-5
NOISE_FACTOR = 8.0
INPUT, OUTPUT = "input", "logits"


@dataclass
class Parity:
    """onnxruntime vs PyTorch on the same inputs."""

    images: int
    max_abs: float          # max |logit difference|
    max_rel: float          # max_abs / max |PyTorch logit|
    top1_agreement: float   # fraction of identical argmax
    fp32_noise: float | None = None  # PyTorch fp32 vs float64 max relative error on a few of the inputs
    limit: float | None = None       # the max_rel tolerance the export was held to

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _session(path: str | Path):
    from gprebn_edge.runtime.ort_runner import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def onnx_parity(path: str | Path, model: nn.Module, batches: Iterable[np.ndarray]) -> Parity:
    """Run the ONNX file in onnxruntime and the model in PyTorch on each float32 NCHW batch."""
    from gprebn_edge.progress import ProgressLine

    session = _session(path)
    n = agree = 0
    max_abs = max_ref = 0.0
    report = ProgressLine("parity check (onnxruntime vs PyTorch)")
    for x in batches:
        ref = model(torch.from_numpy(x)).numpy()
        got = session.run([OUTPUT], {INPUT: x})[0]
        for side, out in (("PyTorch", ref), ("onnxruntime", got)):
            if not np.isfinite(out).all():  # NaN == NaN would otherwise pass as "parity"
                raise GprebnError(f"the model's {side} outputs are not finite (NaN or Inf) on image {n} or after; "
                                  "nothing was written: check the artifact's weights (gprebn-edge info) and the "
                                  "input preprocessing")
        max_abs = max(max_abs, float(np.abs(got - ref).max()))
        max_ref = max(max_ref, float(np.abs(ref).max()))
        agree += int((got.reshape(len(got), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1)).sum())
        n += len(x)
        report.update(n)
    report.close()
    if n == 0:
        raise GprebnError("no inputs to check ONNX parity on")
    return Parity(images=n, max_abs=max_abs, max_rel=max_abs / max(max_ref, 1e-12), top1_agreement=agree / n)


@torch.no_grad()
def fp32_noise(model: nn.Module, x: np.ndarray) -> float:
    """Max relative logit error of `model` in float32 against the same model in float64 on `x`: the
    rounding noise any fp32 implementation of this model has, ONNX or PyTorch."""
    exact = copy.deepcopy(model).double()(torch.from_numpy(x).double())
    approx = model(torch.from_numpy(x)).double()
    return float((approx - exact).abs().max() / exact.abs().max().clamp_min(1e-12))


def parity_limit(model: nn.Module, x: np.ndarray, floor: float = DEFAULT_MAX_REL) -> tuple[float, float]:
    """(fp32 noise, tolerance): onnxruntime must agree with PyTorch within `floor` or, for models whose
    own fp32 rounding is larger (deep nets with large activations), within NOISE_FACTOR x that noise."""
    noise = fp32_noise(model, x)
    return noise, max(floor, NOISE_FACTOR * noise)


def drop_initializer_inputs(proto: Any) -> None:
    """Initializers are exported as graph inputs (`keep_initializers_as_inputs=True`) only because that is
    what switches off the exporter's deduplication of equal-valued initializers: with it on, two convs
    whose folded biases happen to be equal (e.g. all zero in an untrained model) share one initializer
    behind an Identity node, and the graph would depend on the weight values. Here they stop being inputs,
    so the model has one input and every parameter keeps its own PyTorch name."""
    names = {i.name for i in proto.graph.initializer}
    keep = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)


def torchscript_export(model: nn.Module, path: Path, example: torch.Tensor, opset: int) -> None:
    """The default exporter: an already folded model, BN folding left to us (see the module docstring)."""
    # training=PRESERVE (the model is in eval mode) switches off the exporter's own Conv+BN fusion and
    # nothing else: a BN our fold skipped (e.g. after a conv that is called twice) stays a BatchNormalization
    # node with its own names instead of being fused into anonymous `onnx::Conv_N` weights
    with warnings.catch_warnings():  # the deprecation notice, and advice meant for models in training mode
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT], do_constant_folding=True,
                          training=torch.onnx.TrainingMode.PRESERVE,
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                          keep_initializers_as_inputs=True)


Exporter = Callable[[nn.Module, Path, torch.Tensor, int], object]


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor, *,
                check_batches: Iterable[np.ndarray], metadata: dict[str, Any] | None = None,
                opset: int = DEFAULT_OPSET, max_rel: float | None = None, min_agreement: float = 1.0,
                exporter: Exporter = torchscript_export) -> Parity:
    """Export `model` (eval mode) to `path`, check it, compare onnxruntime with PyTorch on `check_batches`
    and only then move it into place. Raises GprebnError (and leaves nothing behind) past the tolerances.

    max_rel None: the tolerance is `parity_limit` (1e-5, or 8x the model's own fp32-vs-float64 error when
    that is larger, measured on up to 8 of the check images). `exporter` writes `model` as ONNX to a path;
    parity is always checked against `model` itself."""
    import onnx

    path = Path(path)
    if path.suffix != ".onnx":
        raise GprebnError(f"ONNX output must end in .onnx, got {path.name}")
    model = model.eval()
    with atomic_path(path) as tmp:
        exporter(model, tmp, example, opset)
        proto = onnx.load(str(tmp))
        drop_initializer_inputs(proto)
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else strict_json(value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        batches = list(check_batches)
        noise = None
        if max_rel is None and batches:
            noise, max_rel = parity_limit(model, batches[0][:8])
        limit = DEFAULT_MAX_REL if max_rel is None else max_rel
        parity = onnx_parity(tmp, model, batches)
        parity.fp32_noise, parity.limit = noise, limit
        if parity.max_rel > limit or parity.top1_agreement < min_agreement:
            raise GprebnError(f"ONNX export does not match PyTorch: max relative logit error {parity.max_rel:.2e} "
                              f"(limit {limit:.1e}), top-1 agreement {100 * parity.top1_agreement:.2f} % on "
                              f"{parity.images} images; nothing was written")
    return parity
