"""Export stage timings and what folding buys, on CPU.

For the built-in model and a ResNet-50-sized model: time to fold, and to export + check parity (onnxruntime
vs PyTorch on real images: built-in data, resized to 224 for the ResNet-50 shape); ONNX node counts of the
folded export and of an unfolded export (BatchNormalization nodes kept, `do_constant_folding=False`); and
onnxruntime CPU latency of folded vs unfolded ONNX at batch 1 and 32, interleaved, both with onnxruntime's
default graph optimizations (which fuse Conv+BN themselves) and with them disabled.

    python benchmarks/export.py            # ~5 minutes on 2 cores
Writes benchmarks/results/export.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from statistics import median

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, environment, publish  # noqa: E402

from gprebn_edge.adaptation import calibration_tensors  # noqa: E402
from gprebn_edge.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: E402
from gprebn_edge.data.sources import open_source  # noqa: E402
from gprebn_edge.export.fold import fold_batchnorm  # noqa: E402
from gprebn_edge.export.onnx_export import export_onnx  # noqa: E402
from gprebn_edge.models.spec import load_model  # noqa: E402


def unfolded_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, do_constant_folding=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def session(path: Path, optimize: bool, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # two sessions are timed in turn: an idle one must not busy-wait on the cores the other is timed on
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def latency(paths: dict[str, Path], x: np.ndarray, optimize: bool, rounds: int, threads: int) -> dict:
    sessions = {k: session(p, optimize, threads) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {"input": x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(rounds):
        for k in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
            t0 = time.perf_counter()
            sessions[k].run(None, {"input": x})
            times[k].append(time.perf_counter() - t0)
    ratio = median(f / u for f, u in zip(times["folded"], times["unfolded"], strict=True))
    return {"folded_ms": 1e3 * median(times["folded"]), "unfolded_ms": 1e3 * median(times["unfolded"]),
            "folded_over_unfolded": ratio}


def run_model(name: str, model: torch.nn.Module, preprocess: Preprocess, n_check: int, rounds: int,
              threads: int, folder: Path) -> dict:
    data = open_source(f"synthetic:gaussian_noise:5:n={n_check}:split=test", preprocess)
    batches = [t.numpy() for t in calibration_tensors(data, 32)]
    example = torch.from_numpy(batches[0][:2])
    t0 = time.perf_counter()
    folded, report = fold_batchnorm(model, example)
    t1 = time.perf_counter()
    paths = {"folded": folder / f"{name}-folded.onnx", "unfolded": folder / f"{name}-unfolded.onnx"}
    parity = export_onnx(folded, paths["folded"], example, check_batches=batches)
    t2 = time.perf_counter()
    unfolded_onnx(model, example, paths["unfolded"])
    nodes = {k: [n.op_type for n in onnx.load(str(p)).graph.node] for k, p in paths.items()}
    row = {"model": name, "fold_s": t1 - t0, "export_and_parity_s": t2 - t1, "total_s": t2 - t0,
           "parity": parity.to_dict(), "folded_bn": len(report.folded), "skipped_bn": len(report.skipped),
           "nodes": {k: len(v) for k, v in nodes.items()},
           "batchnorm_nodes": {k: v.count("BatchNormalization") for k, v in nodes.items()}, "latency": {}}
    x = batches[0]
    for batch in (1, 32):
        xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
        for optimize in (True, False):
            key = f"batch{batch}-{'ort_opt' if optimize else 'ort_noopt'}"
            row["latency"][key] = latency(paths, xb, optimize, rounds, threads)
    print(f"{name}: fold+export+parity {row['total_s']:.2f} s, nodes {row['nodes']}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check-builtin", type=int, default=1000, help="parity images for the built-in model")
    ap.add_argument("--check-resnet50", type=int, default=64, help="parity images for the ResNet-50 shape")
    ap.add_argument("--out", type=Path, default=RESULTS / "export")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    builtin = load_model("builtin:small_resnet")
    r50 = load_model("builtin:resnet50_like")
    r50_pre = Preprocess(resize=224, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_model("builtin:small_resnet", builtin.model, builtin.preprocess, args.check_builtin,
                          args.rounds, args.threads, Path(tmp)),
                run_model("builtin:resnet50_like", r50.model, r50_pre, args.check_resnet50, max(4, args.rounds // 4),
                          args.threads, Path(tmp))]
    payload = {"command": command_line(), "environment": environment(), "results": rows}
    lines = ["# Export stage on CPU", "", f"Command: `{payload['command']}`", "",
             "| model | fold s | export + parity s | parity images | max rel err | top-1 agree | ONNX nodes folded / "
             "unfolded | BN nodes folded / unfolded |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["parity"]
        nodes, bn = r["nodes"], r["batchnorm_nodes"]
        lines.append(f"| {r['model']} | {r['fold_s']:.2f} | {r['export_and_parity_s']:.2f} | {p['images']} | "
                     f"{p['max_rel']:.1e} | {100 * p['top1_agreement']:.1f} % | {nodes['folded']} / "
                     f"{nodes['unfolded']} | {bn['folded']} / {bn['unfolded']} |")
    lines += ["", "(The unfolded export also skips constant folding, so its node count includes Constant and shape "
              "nodes besides the BatchNormalization ones.)", "",
              "onnxruntime CPU latency, median ms (folded / unfolded = median of per-round ratios):", "",
              "| model | setting | folded ms | unfolded ms | folded / unfolded |", "|---|---|---:|---:|---:|"]
    for r in rows:
        for key, v in r["latency"].items():
            lines.append(f"| {r['model']} | {key} | {v['folded_ms']:.2f} | {v['unfolded_ms']:.2f} | "
                         f"{v['folded_over_unfolded']:.3f} |")
    publish(args.out, payload, lines)


if __name__ == "__main__":
    main()
