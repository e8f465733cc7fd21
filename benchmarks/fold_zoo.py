"""BatchNorm folding on every BN pattern of the test zoo and on torchvision's classifiers: exact, and exactly
where it may be.

Models: every entry of `ZOO` and `Untraceable` from tests/export/bn_zoo.py (this script puts that folder on
sys.path to import it), and torchvision's resnet18, mobilenet_v2 and efficientnet_b0 (weights=None) where
torchvision imports (left out otherwise, and the results say so). Each is built with a fixed seed and its BN
statistics and affine parameters are set far from their defaults (`far_from_defaults`; the torchvision
models get `far_from_defaults_deep`, whose scales a deep net survives). Then:

(a) fold with `fold_batchnorm` (torch.fx) and compare the folded with the unfolded model in fp32 on every
    input: max relative logit error = max |folded - unfolded| / max |unfolded| over all of them;
(b) export with `export_onnx` (its own gate switched off with max_rel=1.0, so the figure is recorded rather
    than raised) and run onnxruntime against the *unfolded* PyTorch model on every input: max relative
    error and top-1 agreement. `Untraceable` (torch.fx cannot trace it) is folded in the ONNX graph by
    `export_folded_onnx_fallback`, as the export pipeline does, and reported as folded "in ONNX";
(c) the folded and skipped BNs, and whether they are exactly the expected ones (the zoo's lists; every BN for
    the torchvision models, whose BNs all follow a conv that nothing else consumes).

Inputs: the zoo models take 4-channel images of 5x5 or 6x6 pixels, so real images do not exist for them:
they get N(0, 1) noise of their input shape (`Untraceable` gets U(0, 1): its forward branches on the sign
of the batch sum, and the export traces the positive branch). Their outputs are not class logits (a feature
map for most): "top-1" is the argmax over each sample's flattened output. The torchvision models get the
built-in synthetic images (fog, severity 5) resized to 64x64 and normalized with the ImageNet mean/std. With
random weights a classifier predicts few distinct classes, so the table also gives how many distinct top-1
classes the references have: top-1 agreement says little where that is 1, the max relative error more.

    python benchmarks/fold_zoo.py            # ~10 s on 2 cores, ~40 s with the torchvision models
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "export"))
from _common import RESULTS, command_line, environment, publish  # noqa: E402
from bn_zoo import TORCHVISION_ZOO, ZOO, Untraceable, far_from_defaults, far_from_defaults_deep  # noqa: E402

from gprebn_edge.adapt import calibration_tensors  # noqa: E402
from gprebn_edge.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: E402
from gprebn_edge.data.sources import open_source  # noqa: E402
from gprebn_edge.export.fold import FoldReport, UntraceableModelError, fold_batchnorm  # noqa: E402
from gprebn_edge.export.onnx_export import DEFAULT_MAX_REL, export_onnx, parity_limit  # noqa: E402
from gprebn_edge.export.onnx_fold import export_folded_onnx_fallback  # noqa: E402

BATCH = 250


def _torchvision() -> Any | None:
    try:
        return importlib.import_module("torchvision")
    except Exception:  # not installed, or installed against another torch: the zoo still runs
        return None


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
    try:
        folded, report = fold_batchnorm(model, example)
        reports.append(report)
        to_export: nn.Module = folded
        where, exporter_kw = "PyTorch (torch.fx)", {}
    except UntraceableModelError:
        to_export, where, folded = model, "ONNX (torch.fx cannot trace it)", None

        def exporter(m: nn.Module, path: Path, x: torch.Tensor, opset: int) -> None:
            reports.append(export_folded_onnx_fallback(m, path, x, opset))

        exporter_kw = {"exporter": exporter}
    path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Untraceable: the branch is traced as taken
        gate = export_onnx(to_export, path, example, check_batches=[batches[0][:8]], max_rel=1.0,
                           min_agreement=0.0, **exporter_kw)
    report = reports[0]
    session = _session(path)
    fold_cmp, onnx_cmp, onnx_folded_cmp = Compare(), Compare(), Compare()
    for x in batches:
        ref = model(torch.from_numpy(x)).numpy()
        got = session.run(["logits"], {"input": x})[0]
        onnx_cmp.add(got, ref)
        if folded is not None:
            mine = folded(torch.from_numpy(x)).numpy()
            fold_cmp.add(mine, ref)
            onnx_folded_cmp.add(got, mine)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    got_folded, got_skipped = [b for b, _ in report.folded], [b for b, _ in report.skipped]
    row = {"model": name, "inputs": inputs, "bn": len(bns), "fold_where": where, **report.to_dict(),
           "expected_folded": expected[0], "expected_skipped": expected[1],
           "as_expected": sorted(got_folded) == sorted(expected[0]) and sorted(got_skipped) == sorted(expected[1]),
           "onnx_batchnorm_nodes": ops.count("BatchNormalization"),
           "anonymous_initializers": [t.name for t in graph.initializer if t.name.startswith("onnx::")],
           "fp32_noise": noise, "limit": limit,
           "fold_fp32": fold_cmp.to_dict() if folded is not None else None,
           "onnx_vs_unfolded": onnx_cmp.to_dict(),
           "onnx_vs_folded": onnx_folded_cmp.to_dict() if folded is not None else None,
           "export_gate": gate.to_dict()}
    fold_rel = f"{row['fold_fp32']['max_rel']:.1e}" if folded is not None else "n/a"
    print(f"{name}: folded {len(got_folded)}, skipped {len(got_skipped)}, fold max rel {fold_rel}, "
          f"ONNX max rel {row['onnx_vs_unfolded']['max_rel']:.1e}", flush=True)
    return row


def zoo_models(n: int, seed: int) -> list[tuple[str, Callable[[], nn.Module], list[np.ndarray], tuple, str]]:
    entries = [(k, factory, shape, (folded, skipped), torch.randn) for k, (factory, shape, folded, skipped)
               in ZOO.items()]
    entries.append(("untraceable", Untraceable, (2, 4, 6, 6), (["bn"], []), torch.rand))
    out = []
    for name, factory, shape, expected, draw in entries:
        g = torch.Generator().manual_seed(seed)
        x = draw((n, *shape[1:]), generator=g).numpy()
        kind = "N(0,1)" if draw is torch.randn else "U(0,1)"
        out.append((name, factory, [x[i:i + BATCH] for i in range(0, n, BATCH)], expected,
                    f"{kind} {'x'.join(map(str, shape[1:]))}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="inputs per model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "fold_zoo")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    tv = _torchvision()
    with tempfile.TemporaryDirectory() as tmp:
        for name, factory, batches, expected, inputs in zoo_models(args.n, args.seed):
            torch.manual_seed(args.seed)
            model = far_from_defaults(factory(), args.seed)
            rows.append(run_model(name, model, batches, expected, inputs, Path(tmp)))
        if tv is not None:
            spec = f"synthetic:fog:5:n={args.n}"
            preprocess = Preprocess(resize=64, crop=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            batches = [t.numpy() for t in calibration_tensors(open_source(spec, preprocess), BATCH)]
            for name in TORCHVISION_ZOO:
                torch.manual_seed(args.seed)
                model = far_from_defaults_deep(getattr(tv.models, name)(weights=None), args.seed)
                bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
                rows.append(run_model(f"torchvision {name}", model, batches, (bns, []), f"{spec} 64x64",
                                      Path(tmp)))
    env = {**environment(), "onnx": onnx.__version__, "onnxruntime": ort.__version__,
           "torchvision": f"{tv.__version__} ({Path(tv.__file__).parent})" if tv is not None else None}
    payload = {"command": command_line(), "environment": env, "settings": vars(args) | {"out": str(args.out)},
               "results": rows}
    lines = ["# BatchNorm folding on the BN-pattern zoo", "", f"Command: `{payload['command']}`", "",
             f"{args.n} inputs per model. Relative error: max |difference| / max |reference| over all inputs, fp32. "
             "ONNX is onnxruntime (CPU) on the folded export against the *unfolded* PyTorch model. Top-1: argmax "
             "of each sample's flattened output (the zoo models output feature maps). Limit: max(1e-5, 8 x the "
             "model's own fp32-vs-float64 error), the export gate's tolerance.", "",
             "| model | inputs | fold in | BNs | folded | skipped | as expected | BN nodes in ONNX | PyTorch folded "
             "vs unfolded | ONNX vs PyTorch | top-1 agree | distinct top-1 | fp32 noise | <= 1e-5 |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        fold = r["fold_fp32"]
        ox = r["onnx_vs_unfolded"]
        fold_rel = f"{fold['max_rel']:.1e}" if fold else "n/a"
        worst = max(ox["max_rel"], fold["max_rel"] if fold else 0.0)
        ok = "yes" if worst <= DEFAULT_MAX_REL else ("within limit" if worst <= r["limit"] else "NO")
        lines.append(f"| {r['model']} | {r['inputs']} | {r['fold_where'].split(' ')[0]} | {r['bn']} | "
                     f"{len(r['folded'])} | {len(r['skipped'])} | {'yes' if r['as_expected'] else 'NO'} | "
                     f"{r['onnx_batchnorm_nodes']} | {fold_rel} | "
                     f"{ox['max_rel']:.1e} | {100 * ox['top1_agreement']:.1f} % | {ox['distinct_top1']} | "
                     f"{r['fp32_noise']:.1e} | {ok} |")
    lines += ["", "Skipped BNs and why (each should stay a static BatchNormalization node in the ONNX):", ""]
    lines += [f"- {r['model']}: " + "; ".join(f"`{s['bn']}` ({s['reason']})" for s in r["skipped"])
              for r in rows if r["skipped"]]
    for r in rows:
        if r["anonymous_initializers"]:
            lines += ["", f"{r['model']}: {len(r['skipped'])} skipped BN(s) but {r['onnx_batchnorm_nodes']} "
                      "BatchNormalization node(s) in the ONNX: the TorchScript exporter fused them into the convs "
                      "itself while exporting, under anonymous initializer names "
                      f"({', '.join(r['anonymous_initializers'])})."]
    if tv is None:
        lines += ["", "torchvision does not import here: resnet18, mobilenet_v2 and efficientnet_b0 were left out."]
    publish(args.out, payload, lines)


if __name__ == "__main__":
    main()
