"""Does adapting within a memory budget change what ships? GpreBN at logical batch 64, unconstrained and
under memory plans (budget.plan_memory) that force smaller micro-batches and block checkpointing, side by
side on the same data: deployed error of the frozen model on held-out test images.

Benchmarks: `builtin` (builtin:small_resnet, the built-in images, the calib and test splits) and `fashion`
(Fashion-MNIST t10k with models/fashion_small_resnet.safetensors, as fashion_accuracy.py), each under the
8 severity-5 corruptions of fashion_accuracy.py, 2000 calibration and 2000 test images per domain.

A plan's budget is chosen so that the planner picks the micro-batch asked for (`--micro` 8 -> the budget
that holds 8 images per step; `--micro 1c` -> batch 1 with its blocks checkpointed); the budget is reported. The
issue's criterion: deployed error within 2 % (relative) of the unconstrained run.

    python benchmarks/budget_accuracy.py                      # both benchmarks, micro 8 and 1c
    python benchmarks/budget_accuracy.py --benchmarks builtin --micro 8 --domains fog,contrast
Writes benchmarks/results/budget_accuracy.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import RESULTS, command_line, environment, publish  # noqa: E402
from accuracy import synthetic_data  # noqa: E402
from fashion_accuracy import DEFAULT_CORRUPTIONS, WEIGHTS, fashion_data  # noqa: E402

from gprebn_edge.adaptation import AdaptConfig, adapt_and_freeze, evaluate  # noqa: E402
from gprebn_edge.budget import SLACK, MemoryPlan, footprint, format_size, plan_memory  # noqa: E402
from gprebn_edge.data.idx import load_fashion_mnist, to_rgb32  # noqa: E402
from gprebn_edge.models.spec import load_model  # noqa: E402
from gprebn_edge.progress import ProgressLine  # noqa: E402

BATCH = 64
BASELINE = 400_000_000  # a process's memory before adapting, fixed here so that the plans are reproducible


def plan_for(model, micro: str, holdout: int = 0) -> MemoryPlan:
    """The plan that --max-memory gives when the budget holds `micro` images per step ('2c': checkpointed)."""
    checkpoint = micro.endswith("c")
    m = int(micro.rstrip("c"))
    fp = footprint(model, (3, 32, 32), "gprebn")
    fixed = plan_memory(model, (3, 32, 32), "gprebn", BATCH, 10 ** 12, baseline_bytes=BASELINE,
                        held_images=holdout).fixed
    if checkpoint:  # between m images checkpointed and one image without checkpointing
        budget = fixed + int(SLACK * (m * fp.step(True, checkpoint=True) + 0.5 * (fp.step(True) - fp.step(True, True))))
    else:
        budget = fixed + int(SLACK * (m + 0.5) * fp.step(True))
    plan = plan_memory(model, (3, 32, 32), "gprebn", BATCH, budget, baseline_bytes=BASELINE,
                       held_images=holdout)
    assert plan.micro_batch == m and plan.checkpoint == checkpoint, (plan, micro)
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", nargs="+", default=["builtin", "fashion"], choices=["builtin", "fashion"])
    parser.add_argument("--micro", nargs="+", default=["8", "1c"])
    parser.add_argument("--domains", default=",".join(DEFAULT_CORRUPTIONS))
    parser.add_argument("--n-calib", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS / "budget_accuracy")
    args = parser.parse_args()
    domains = args.domains.split(",")
    rows = []
    progress = ProgressLine("budget_accuracy", len(args.benchmarks) * len(domains) * (1 + len(args.micro)),
                            unit="cells", every=30.0)
    for bench in args.benchmarks:
        if bench == "builtin":
            loaded = load_model("builtin:small_resnet")
            data = synthetic_data(args.n_calib, args.n_test, loaded.preprocess)
        else:
            loaded = load_model("builtin:small_resnet", WEIGHTS)
            images, labels = load_fashion_mnist("t10k")
            data = fashion_data(to_rgb32(images), labels, args.n_calib, args.n_test, loaded.preprocess)
        plans: dict[str, MemoryPlan | None] = {"none": None, **{m: plan_for(loaded.model, m) for m in args.micro}}
        for domain in domains:
            calib, test = data(domain, 5)
            for name, plan in plans.items():
                start = time.perf_counter()
                static, online, _ = adapt_and_freeze(loaded.model, calib, AdaptConfig(batch_size=BATCH), plan=plan)
                seconds = time.perf_counter() - start
                deployed = evaluate(static, test)
                rows.append({"benchmark": bench, "domain": domain, "plan": name, "steps": online["steps"],
                             "budget": plan.budget if plan else None,
                             "micro_batch": plan.micro_batch if plan else BATCH,
                             "checkpoint": bool(plan and plan.checkpoint), "online_error": online["online_error"],
                             "deployed_error": deployed["error"], "seconds": round(seconds, 2)})
                progress.update(len(rows))
                print(f"{bench} {domain} {name}: deployed {100 * deployed['error']:.2f} % "
                      f"({seconds:.0f} s)", file=sys.stderr, flush=True)
    progress.close()
    lines = ["# Deployed error within a memory budget", "", f"`{command_line()}`", "",
             f"GpreBN defaults, logical batch {BATCH} (one optimizer step per 64 images), {args.n_calib} calibration "
             f"and {args.n_test} test images per domain, severity 5, mean over {len(domains)} corruptions "
             f"({', '.join(domains)}). Budgets are what `--max-memory` would need for the micro-batch, with the "
             f"process's own memory fixed at {format_size(BASELINE)} so the plans are reproducible.", "",
             "| benchmark | plan | budget | micro-batch | deployed error % | vs unconstrained (relative) "
             "| worst domain |",
             "|---|---|---:|---:|---:|---:|---|"]
    payload_summary = []
    for bench in args.benchmarks:
        base = {r["domain"]: r["deployed_error"] for r in rows if r["benchmark"] == bench and r["plan"] == "none"}
        mean_base = statistics.mean(base.values())
        for name in ["none", *args.micro]:
            sel = [r for r in rows if r["benchmark"] == bench and r["plan"] == name]
            mean_err = statistics.mean(r["deployed_error"] for r in sel)
            rel = (mean_err - mean_base) / mean_base
            worst = max(sel, key=lambda r: abs(r["deployed_error"] - base[r["domain"]]))
            diff = 100 * (worst["deployed_error"] - base[worst["domain"]])
            budget = format_size(sel[0]["budget"]) if sel[0]["budget"] else "-"
            micro = f"{sel[0]['micro_batch']}{' (checkpointed)' if sel[0]['checkpoint'] else ''}"
            change = "-" if name == "none" else f"{100 * rel:+.2f} %"
            worst_text = "-" if name == "none" else f"{worst['domain']} {diff:+.2f} points"
            lines.append(f"| {bench} | {name} | {budget} | {micro} | {100 * mean_err:.2f} | {change} | {worst_text} |")
            payload_summary.append({"benchmark": bench, "plan": name, "mean_deployed_error": mean_err,
                                    "relative_change": rel})
    heads = " | ".join(["none", *args.micro])
    lines += ["", "Per domain, deployed error %:", "", f"| benchmark | domain | {heads} |",
              "|---|---|" + "---:|" * (1 + len(args.micro))]
    for bench in args.benchmarks:
        for domain in domains:
            vals = [next(r for r in rows if r["benchmark"] == bench and r["domain"] == domain and r["plan"] == p)
                    for p in ["none", *args.micro]]
            cells = " | ".join(f"{100 * v['deployed_error']:.2f}" for v in vals)
            lines.append(f"| {bench} | {domain} | {cells} |")
    payload = {"command": command_line(), "environment": environment(), "args": {**vars(args), "out": str(args.out)},
               "rows": rows, "summary": payload_summary}
    publish(args.out, payload, lines)


if __name__ == "__main__":
    main()
