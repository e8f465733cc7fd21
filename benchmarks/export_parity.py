"""The export stage's promises, checked through the library and CLI path (`export_artifact`) a user takes.

1. Identical graphs: for the built-in model and a ResNet-50-sized model, the adapted and the unadapted
   (source) ONNX exported from the same checkpoint have the same op list, the same node wiring and the
   same initializer names, and no BatchNormalization node; only initializer values differ.
2. The adapted ONNX, run in onnxruntime one image at a time (batch 1) on each corruption's held-out test
   split, gives the error of the adapted PyTorch model, per corruption (severity 5).

    python benchmarks/export_parity.py                  # ~4 minutes on 2 cores
    python benchmarks/export_parity.py --domains gaussian_noise,fog --n-test 500 --out /tmp/parity
Writes benchmarks/results/export_parity.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, environment, publish  # noqa: E402

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file  # noqa: E402
from gprebn_edge.checkpoint import rebuild_model  # noqa: E402
from gprebn_edge.data.corruptions import CORRUPTIONS  # noqa: E402
from gprebn_edge.data.preprocess import Preprocess  # noqa: E402
from gprebn_edge.data.sources import open_source  # noqa: E402
from gprebn_edge.export.pipeline import export_artifact  # noqa: E402


def graph_signature(path: Path) -> dict:
    """What must be equal between the adapted and unadapted ONNX: ops, wiring, initializer names/shapes."""
    graph = onnx.load(str(path)).graph
    return {"ops": [n.op_type for n in graph.node],
            "wiring": [(n.op_type, tuple(n.input), tuple(n.output)) for n in graph.node],
            "initializers": sorted((i.name, tuple(i.dims)) for i in graph.initializer)}


def identical_graphs(adapted: Path, unadapted: Path) -> dict:
    a, u = graph_signature(adapted), graph_signature(unadapted)
    values_differ = sum(
        not np.array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))
        for x, y in zip(sorted(onnx.load(str(adapted)).graph.initializer, key=lambda i: i.name),
                        sorted(onnx.load(str(unadapted)).graph.initializer, key=lambda i: i.name), strict=True))
    return {"same_ops": a["ops"] == u["ops"], "same_wiring": a["wiring"] == u["wiring"],
            "same_initializer_names": a["initializers"] == u["initializers"],
            "nodes": len(a["ops"]), "batchnorm_nodes": a["ops"].count("BatchNormalization") +
            u["ops"].count("BatchNormalization"), "initializers": len(a["initializers"]),
            "initializers_with_different_values": values_differ, "ops": a["ops"]}


def ort_error_batch1(path: Path, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(["logits"], {"input": images[i:i + 1]})[0] for i in range(len(images))])
    pred = logits.argmax(1)
    return float((pred != labels).mean()), logits


@torch.no_grad()
def torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    return torch.cat([model(torch.from_numpy(images[i:i + 256])) for i in range(0, len(images), 256)]).numpy()


def run_domain(domain: str, n_calib: int, n_test: int, folder: Path) -> dict:
    sev = "" if domain in ("clean", "style") else ":5"
    artifact = folder / f"{domain}.safetensors"
    adapt_to_file("builtin:small_resnet", f"synthetic:{domain}{sev}:n={n_calib}:split=calib", artifact,
                  AdaptConfig(method="gprebn", batch_size=64))
    test_spec = f"synthetic:{domain}{sev}:n={n_test}:split=test"
    adapted_onnx, source_onnx = folder / f"{domain}.onnx", folder / f"{domain}-unadapted.onnx"
    manifest = export_artifact(artifact, adapted_onnx, data=test_spec, check_images=n_test)
    export_artifact(artifact, source_onnx, unadapted=True, data=test_spec, check_images=n_test)
    model, meta = rebuild_model(artifact, "adapted")
    source = open_source(test_spec, Preprocess.from_dict(meta["preprocess"]), shuffle=False)
    batches = list(source.batches(256))
    images = np.concatenate([b.images for b in batches])
    labels = np.concatenate([b.labels for b in batches if b.labels is not None])
    ref = torch_logits(model, images)
    ort_err, ort_logits = ort_error_batch1(adapted_onnx, images, labels)
    src_err, _ = ort_error_batch1(source_onnx, images, labels)
    graphs = identical_graphs(adapted_onnx, source_onnx)
    graphs.pop("ops")
    return {"domain": domain + ("-5" if sev else ""), "test_images": len(images),
            "source_onnx_error": src_err, "adapted_torch_error": float((ref.argmax(1) != labels).mean()),
            "adapted_onnx_b1_error": ort_err,
            "top1_agreement_b1": float((ort_logits.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_b1": float(np.abs(ort_logits - ref).max()),
            "max_rel_b1": float(np.abs(ort_logits - ref).max() / np.abs(ref).max()),
            "export_parity": manifest["parity"], "graphs": graphs}


def run_resnet50(n_calib: int, folder: Path) -> dict:
    """A ResNet-50-shaped model (random weights, 224x224): adapt briefly, export adapted and unadapted."""
    artifact = folder / "resnet50_like.safetensors"
    t0 = time.perf_counter()
    adapt_to_file("builtin:resnet50_like", f"synthetic:fog:5:n={n_calib}:split=calib", artifact,
                  AdaptConfig(method="gprebn", batch_size=16, refresh_batch=16, eval_limit=16),
                  preprocess={"resize": 224, "crop": 224})
    t1 = time.perf_counter()
    adapted_onnx, source_onnx = folder / "resnet50_like.onnx", folder / "resnet50_like-unadapted.onnx"
    check = "synthetic:fog:5:n=64:split=test"
    manifest = export_artifact(artifact, adapted_onnx, data=check, check_images=64)
    t2 = time.perf_counter()
    export_artifact(artifact, source_onnx, unadapted=True, data=check, check_images=64)
    graphs = identical_graphs(adapted_onnx, source_onnx)
    return {"model": "builtin:resnet50_like", "adapt_s": t1 - t0, "export_adapted_s": t2 - t1,
            "parity": manifest["parity"], "fold": {k: len(v) for k, v in manifest["fold"].items()},
            "graphs": graphs}


def builtin_graphs(folder: Path) -> dict:
    """Op list of the built-in model's adapted vs unadapted ONNX (from the first domain's export)."""
    files = sorted(folder.glob("*-unadapted.onnx"))
    unadapted = next(f for f in files if not f.name.startswith("resnet50"))
    return identical_graphs(unadapted.with_name(unadapted.name.replace("-unadapted", "")), unadapted)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default=",".join([*CORRUPTIONS, "style"]))
    ap.add_argument("--n-calib", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--n-calib-resnet50", type=int, default=32)
    ap.add_argument("--skip-resnet50", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "export_parity")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for domain in args.domains.split(","):
            t0 = time.perf_counter()
            rows.append(run_domain(domain, args.n_calib, args.n_test, folder))
            r = rows[-1]
            print(f"{r['domain']}: torch {100 * r['adapted_torch_error']:.2f} % onnx b1 "
                  f"{100 * r['adapted_onnx_b1_error']:.2f} % ({time.perf_counter() - t0:.1f} s)", flush=True)
        small = builtin_graphs(folder)
        big = None if args.skip_resnet50 else run_resnet50(args.n_calib_resnet50, folder)
    payload = {"command": command_line(), "environment": environment(), "domains": rows,
               "builtin_graphs": small, "resnet50": big}
    lines = ["# Export parity: adapted ONNX vs adapted PyTorch, and adapted vs unadapted graphs", "",
             f"Command: `{payload['command']}`", "",
             "## Per corruption (severity 5): error on the held-out test split", "",
             "builtin:small_resnet adapted with GpreBN (batch 64) on the calibration split, exported with "
             "`export_artifact` (adapted and `unadapted=True`); onnxruntime CPU runs one image at a time.", "",
             "| domain | images | unadapted ONNX | adapted PyTorch | adapted ONNX (batch 1) | top-1 agreement | "
             "max rel logit err | graphs identical |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        g = r["graphs"]
        same = g["same_ops"] and g["same_wiring"] and g["same_initializer_names"] and g["batchnorm_nodes"] == 0
        lines.append(f"| {r['domain']} | {r['test_images']} | {100 * r['source_onnx_error']:.2f} % | "
                     f"{100 * r['adapted_torch_error']:.2f} % | {100 * r['adapted_onnx_b1_error']:.2f} % | "
                     f"{100 * r['top1_agreement_b1']:.2f} % | {r['max_rel_b1']:.1e} | {'yes' if same else 'NO'} |")
    if rows:
        mean = {k: 100 * float(np.mean([r[k] for r in rows]))
                for k in ("source_onnx_error", "adapted_torch_error", "adapted_onnx_b1_error")}
        lines.append(f"| mean | | {mean['source_onnx_error']:.2f} % | {mean['adapted_torch_error']:.2f} % | "
                     f"{mean['adapted_onnx_b1_error']:.2f} % | | | |")
    lines += ["", "## Adapted vs unadapted ONNX graphs", "",
              "| model | nodes | BatchNormalization nodes | same ops | same wiring | same initializer names | "
              "initializers (values differ) |", "|---|---:|---:|---|---|---|---:|"]
    for name, g in (("builtin:small_resnet", small), ("builtin:resnet50_like", big and big["graphs"])):
        if g:
            differ = g["initializers_with_different_values"]
            lines.append(f"| {name} | {g['nodes']} | {g['batchnorm_nodes']} | {g['same_ops']} | {g['same_wiring']} | "
                         f"{g['same_initializer_names']} | {g['initializers']} ({differ}) |")
    for name, g in (("builtin:small_resnet", small), ("builtin:resnet50_like", big and big["graphs"])):
        if g:
            lines += ["", f"Op list of {name} (adapted = unadapted): `{' '.join(g['ops'])}`"]
    if big:
        lines += ["", f"ResNet-50 shape: adapt {big['adapt_s']:.1f} s ({args.n_calib_resnet50} images at 224x224), "
                  f"fold + export + parity {big['export_adapted_s']:.1f} s, parity {big['parity']['images']} images "
                  f"max rel {big['parity']['max_rel']:.1e}, top-1 agreement {100 * big['parity']['top1_agreement']:.1f}"
                  f" %; BNs folded {big['fold']['folded']}, skipped {big['fold']['skipped']}."]
    publish(args.out, payload, lines)


if __name__ == "__main__":
    main()
