"""Time per adaptation step of `tent` and `gprebn` (and an eval forward), side by side, at batch 64.

Rounds are interleaved (tent, gprebn, eval in a shuffled order each round) so that machine drift hits all
modes alike; the reported ratio is the median of the per-round ratios. Models: the built-in small ResNet
(32x32) and a ResNet-50-sized model (torchvision's resnet50 where importable, else the project's own
definition of the same shape), 224x224 input.

    python benchmarks/adapt_speed.py                        # CPU, ~10 minutes on 2 cores
    python benchmarks/adapt_speed.py --device cuda \
        --models torchvision:resnet18,torchvision:resnet50,torchvision:mobilenet_v2
Writes benchmarks/results/adapt_speed.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, environment, publish  # noqa: E402

from gprebn_edge.methods import make_adapter  # noqa: E402
from gprebn_edge.models.spec import build_model, load_model  # noqa: E402


def resolve(spec: str) -> tuple[torch.nn.Module, int, str]:
    """(model, input size, name) — resnet50 falls back to the built-in same-shape definition."""
    if spec == "resnet50":
        try:
            model, _ = build_model("torchvision:resnet50")
            return model.eval(), 224, "torchvision:resnet50"
        except Exception:  # torchvision missing or broken: same shape, our definition
            spec = "builtin:resnet50_like"
    if spec == "builtin:small_resnet":
        return load_model(spec).model, 32, spec
    model, pre = build_model(spec)
    return model.eval(), pre.crop or 224, spec


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_modes(model: torch.nn.Module, size: int, batch: int, rounds: int, warmup: int,
               device: torch.device, seed: int) -> dict:
    torch.manual_seed(seed)
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    adapters = {m: make_adapter(m, model, lr=1e-4) for m in ("tent", "gprebn")}

    @torch.no_grad()
    def forward() -> None:
        model(x)

    steps = {"tent": lambda: adapters["tent"].step(x), "gprebn": lambda: adapters["gprebn"].step(x),
             "eval": forward}
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = interleave(steps, rounds, device, seed)
    ratios = step_ratios(times)
    ratio = [g / t for g, t in zip(times["gprebn"], times["tent"], strict=True)]
    return {**ratios, "gprebn_over_tent_range": [min(ratio), max(ratio)], "rounds": rounds}


def interleave(steps: dict, rounds: int, device: torch.device, seed: int) -> dict[str, list[float]]:
    """Seconds per call of each step, over `rounds` rounds that each run every step once in a fresh random
    order (drift and caches hit all steps alike), synchronized on a GPU."""
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            steps[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def step_ratios(times: dict[str, list[float]]) -> dict:
    """Median ms per step, and the medians of the paired per-round ratios GpreBN/Tent, GpreBN/eval, Tent/eval."""
    def paired(a: str, b: str) -> float:
        return median([x / y for x, y in zip(times[a], times[b], strict=True)])

    return {"median_ms": {k: 1e3 * median(v) for k, v in times.items()},
            "gprebn_over_tent": paired("gprebn", "tent"), "gprebn_over_eval": paired("gprebn", "eval"),
            "tent_over_eval": paired("tent", "eval")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="builtin:small_resnet,resnet50")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", default="100,4", help="rounds per model (one value or one per model)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "adapt_speed")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    specs = args.models.split(",")
    rounds = [int(r) for r in args.rounds.split(",")]
    rounds += [rounds[-1]] * (len(specs) - len(rounds))
    results = []
    for spec, n in zip(specs, rounds, strict=False):
        model, size, name = resolve(spec)
        r = time_modes(model, size, args.batch, n, args.warmup, device, args.seed)
        results.append({"model": name, "input": size, "batch": args.batch, **r})
        print(f"{name}: tent {r['median_ms']['tent']:.1f} ms, gprebn {r['median_ms']['gprebn']:.1f} ms, "
              f"eval {r['median_ms']['eval']:.1f} ms, gprebn/tent {r['gprebn_over_tent']:.3f}", flush=True)
    payload = {"command": command_line(), "environment": environment(), "device": str(device), "results": results}
    lines = ["# Adaptation step time (side by side, interleaved rounds)", "", f"Command: `{payload['command']}`", "",
             "| model | input | batch | eval ms | tent step ms | gprebn step ms | gprebn / tent (min-max) | "
             "gprebn / eval | tent / eval |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ms = r["median_ms"]
        lo, hi = r["gprebn_over_tent_range"]
        lines.append(f"| {r['model']} | {r['input']} | {r['batch']} | {ms['eval']:.1f} | {ms['tent']:.1f} | "
                     f"{ms['gprebn']:.1f} | {r['gprebn_over_tent']:.3f} ({lo:.2f}-{hi:.2f}) | "
                     f"{r['gprebn_over_eval']:.2f} | {r['tent_over_eval']:.2f} |")
    publish(args.out, payload, lines)


if __name__ == "__main__":
    main()
