"""Section `parity`: the torch runner on the device (folded, fp32 without and with TF32, fp16, CUDA graphs)
against onnxruntime on the CPU running the folded ONNX export of the same model, on the same images."""

from __future__ import annotations

from typing import Any

from gpu_sections.harness import SHIFT, Case, Check


def compare(got: Any, ref: Any) -> dict[str, float]:
    """Top-1 agreement (the library's) and max relative logit error of `got` against `ref`."""
    import numpy as np

    from gprebn_edge.runtime.metrics import agreement

    return {"agreement": agreement(got, ref), "max_rel": float(np.abs(got - ref).max() / np.abs(ref).max())}


def run(c: Check) -> None:
    """Torch runner on the device (folded, fp32 without and with TF32, fp16; CUDA graphs) against onnxruntime
    on the CPU running the folded ONNX export of the same model, on the same images."""
    # the dry run: the built-in model only (a depthwise model's float64 reference costs half a minute of CPU)
    names = ["builtin"] if c.quick else ["builtin", "resnet50", "mobilenet_v2", "efficientnet_lite0"]
    n = 16 if c.quick else 64
    for case in c.models(names):
        if not c.enough(8 if c.quick else 20, case.name):
            break
        with c.attempt(case.name):
            _parity(c, case, n)


def _parity(c: Check, case: Case, n: int) -> None:
    import numpy as np
    import torch

    from gprebn_edge.export.fold import fold_batchnorm
    from gprebn_edge.export.pipeline import export_model
    from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner
    from gprebn_edge.runtime.torch_runner import TorchRunner

    images, _ = c.images(case, n)
    with torch.no_grad():
        classes = int(case.model(torch.from_numpy(images[:1])).shape[1])
    onnx = c.tmp / f"{case.name}.onnx"
    manifest = export_model(case.model, {"preprocess": case.preprocess.to_dict(), "num_classes": classes}, onnx,
                            [images], which="source", data=f"synthetic:{SHIFT}:5")
    with OnnxRuntimeRunner(onnx) as ort:
        ref = ort.infer(images)
    shape = (3, case.size, case.size)
    got: dict[str, Any] = {}
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        with TorchRunner(case.model, device=c.device, input_shape=shape, prepare=fold_batchnorm) as r:
            got["fp32"] = r.infer(images)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    if c.cuda:
        with TorchRunner(case.model, device=c.device, input_shape=shape, prepare=fold_batchnorm) as r:
            got["fp32 default (TF32 conv)" if tf32 else "fp32 default"] = r.infer(images)
        with TorchRunner(case.model, device=c.device, input_shape=shape, cuda_graphs=True, prepare=fold_batchnorm) as r:
            got["fp32 CUDA graphs"] = r.infer(images)
            r.infer(images[:3])  # a new shape: re-captured
            got["fp32 CUDA graphs, after re-capture"] = r.infer(images)
    with TorchRunner(case.model, device=c.device, input_shape=shape, fp16=True, prepare=fold_batchnorm) as r:
        got["fp16"] = r.infer(images)
    c.entry.setdefault("export", {})[case.name] = manifest["parity"]
    for mode, logits in got.items():
        m = compare(logits, ref)
        c.row(model=case.name, mode=mode, images=len(images), weights="trained" if case.trained else "random",
              top1_agreement=m["agreement"], max_rel_error=m["max_rel"], finite=bool(np.isfinite(logits).all()))
        limit, agree = (0.05, 0.97) if mode == "fp16" else (2e-2, 0.99) if "TF32" in mode else (1e-4, 0.99)
        if not np.isfinite(logits).all() or m["max_rel"] > limit:
            c.fail(f"{case.name} {mode}: max relative error {m['max_rel']:.2e} > {limit:g}")
        if case.trained and m["agreement"] < agree:
            c.fail(f"{case.name} {mode}: top-1 agreement {m['agreement']:.3f} < {agree}")
    c.say(f"  {case.name}: fp32 max rel {compare(got['fp32'], ref)['max_rel']:.2e}, fp16 agreement "
          f"{compare(got['fp16'], ref)['agreement']:.3f}")


