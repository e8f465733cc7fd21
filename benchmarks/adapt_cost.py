"""What `gprebn-edge adapt` costs, per method and batch size: wall time, peak RSS and the passes it makes,
beside a plain no-grad forward and a plain Tent step on the same model and images, in the same run.

Every configuration runs in a fresh process (the adapt CLI itself, or this script with --child for the two
references), and its peak RSS is that process's own (os.wait4's ru_maxrss). Configurations are interleaved
in rounds (`--repeat`), so drift on a shared machine spreads over all of them; the tables give medians, and
the coefficient of variation of the wall times.

- `forward`: the model in eval mode, one pass over the same images at the same batch under torch.no_grad().
- `tent-step`: the reference tent.py's step (train-mode BN without running statistics, mean entropy, Adam
  lr 1e-3 on the BN affine), one step per batch over the same images.

Models: `lite0` = EfficientNet-Lite0 (examples/efficientnet_lite0.py) on the walk-through's site images
(`python benchmarks/real_photos.py --write-site /tmp/site_images/`, 432 images, 224x224); `builtin` =
builtin:small_resnet on 432 built-in images under gaussian noise 5 (32x32).

    python benchmarks/adapt_cost.py --site /tmp/site_images            # both models, every method, 64/16/4
    python benchmarks/adapt_cost.py --models lite0 --budget 2GB --methods gprebn --batches 64
Writes benchmarks/results/adapt_cost.json and .md (or --out STEM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from _common import RESULTS, command_line, environment, environment_line, publish, run_child, write_results  # noqa: E402

from gprebn_edge.progress import ProgressLine  # noqa: E402

MODELS = {"lite0": str(ROOT / "examples" / "efficientnet_lite0.py") + ":make_model", "builtin": "builtin:small_resnet"}
BUILTIN_DATA = "synthetic:gaussian_noise:5:n=432"
METHODS = ("source", "bn", "adabn", "tent", "gprebn")
BIN = Path(sys.executable).parent

# The measurements of the code before this change (issue 17; fresh clone, 2-core CPU, /usr/bin/time).
BEFORE = [("source", 64, 93, 5.7), ("adabn", 64, 107, 5.7), ("tent", 64, 111, 7.4), ("gprebn", 64, 109, 8.3),
          ("gprebn", 16, 126, 6.4), ("forward (no grad)", 64, 3.9, 1.3), ("tent step (reference)", 64, None, 5.8)]


def adapt_cmd(model: str, data: str, method: str, batch: int, out: Path, budget: str | None) -> list[str]:
    cmd = [str(BIN / "gprebn-edge"), "adapt", "--model", model, "--data", data, "--method", method,
           "--batch-size", str(batch), "-o", str(out.with_suffix(".safetensors")), "--json", str(out), "--force"]
    return cmd + (["--max-memory", budget] if budget else [])


def child(kind: str, model: str, data: str, batch: int) -> None:
    """The two references, in this (fresh) process."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from gprebn_edge.data.sources import open_source
    from gprebn_edge.methods import entropy
    from gprebn_edge.models.spec import load_model

    loaded = load_model(model)
    net = loaded.model
    source = open_source(data, loaded.preprocess)
    if kind == "forward":
        net.eval()
        with torch.no_grad():
            for b in source.batches(batch):
                net(torch.from_numpy(b.images))
        return
    # tent.py's configure_model + collect_params + forward_and_adapt
    net.train()
    net.requires_grad_(False)
    params = []
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            params += [m.weight, m.bias]
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    for b in source.batches(batch):
        if len(b.images) < 2:
            continue
        loss = entropy(net(torch.from_numpy(b.images))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for name in args.models:
        data = str(args.site) if name == "lite0" else BUILTIN_DATA
        for batch in args.batches:
            if args.budget and "gprebn" in args.methods:  # first: the run that must stay under its budget
                out.append({"model": name, "run": "gprebn", "batch": batch, "data": data, "budget": args.budget})
            for kind in ("forward", "tent-step"):
                out.append({"model": name, "run": kind, "batch": batch, "data": data})
            for method in args.methods:
                out.append({"model": name, "run": method, "batch": batch, "data": data, "budget": None})
    return out


def measure(cfg: dict[str, Any], tmp: Path) -> dict[str, Any]:
    model = MODELS[cfg["model"]]
    if cfg["run"] in ("forward", "tent-step"):
        cmd = [sys.executable, __file__, "--child", cfg["run"], "--child-model", model, "--child-data", cfg["data"],
               "--child-batch", str(cfg["batch"])]
        wall, rss, rc, tail = run_child(cmd)
        return {"wall": wall, "rss": rss, "rc": rc, "error": tail if rc else None}
    out = tmp / f"{cfg['model']}-{cfg['run']}-{cfg['batch']}-{bool(cfg.get('budget'))}.json"
    wall, rss, rc, tail = run_child(adapt_cmd(model, cfg["data"], cfg["run"], cfg["batch"], out, cfg.get("budget")))
    row: dict[str, Any] = {"wall": wall, "rss": rss, "rc": rc, "error": tail if rc else None}
    if rc == 0:
        s = json.loads(out.read_text())
        row.update(passes=s["passes"], images=s["images"], held_back=s["held_back"], verdict=s["health"]["verdict"],
                   stage_seconds=s["stage_seconds"], memory_plan=s.get("memory_plan"))
    return row


def summarize(cfg: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["rc"] == 0]
    walls = [r["wall"] for r in ok]
    row = {**cfg, "runs": runs, "ok": len(ok) == len(runs)}
    if ok:
        row["wall_median"] = statistics.median(walls)
        row["wall_cv"] = statistics.pstdev(walls) / statistics.mean(walls) if len(walls) > 1 else None
        row["rss_max"] = max(r["rss"] for r in ok)
        for key in ("passes", "images", "held_back", "verdict", "memory_plan"):
            if key in ok[-1]:
                row[key] = ok[-1][key]
    return row


def _ref(rows: list[dict[str, Any]], model: str, run: str, batch: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["model"] == model and r["run"] == run and r["batch"] == batch
                 and r.get("ok")), None)


def _passes(p: dict[str, int] | None, images: int | None) -> str:
    if not p:
        return "-"
    total = images or 1
    parts = [f"{k} {v / total:.2g}" if k in ("online", "refresh") else f"{k} {v}" for k, v in p.items() if v]
    return ", ".join(parts)


def markdown(payload: dict[str, Any]) -> list[str]:
    rows = payload["rows"]
    gb = 1e9
    lines = ["# Cost of `gprebn-edge adapt`", "", f"`{payload['command']}`", "",
             "Each row is one configuration in a fresh process: wall time (median of the rounds), peak RSS of "
             "that process (largest over the rounds), and the images each pass ran (`online`/`refresh` in "
             "passes over the calibration images, `probe`/`health` in images). Ratios compare with the reference "
             "runs at the same batch in the same run: statistics methods against the plain no-grad forward, "
             "`tent` and `gprebn` against the plain Tent step.",
             "", "**The machine was shared** with other engineers' jobs (2 cores): wall times are noisy; peak RSS "
             "is not. CV = coefficient of variation of the wall time over the rounds.", ""]
    for model in payload["args"]["models"]:
        lines += [f"## {model}: {MODELS[model].split('/')[-1]} on "
                  f"{payload['args']['site'] if model == 'lite0' else BUILTIN_DATA}", "",
                  "| run | batch | wall s (CV) | peak RSS GB | x forward | x tent step | passes | verdict |",
                  "|---|---:|---:|---:|---:|---:|---|---|"]
        for r in rows:
            if r["model"] != model:
                continue
            name = r["run"] + (f" --max-memory {r['budget']}" if r.get("budget") else "")
            if not r.get("ok"):
                lines.append(f"| {name} | {r['batch']} | failed | | | | | {r['runs'][-1]['error']!r:.80} |")
                continue
            fwd = _ref(rows, model, "forward", r["batch"])
            tent = _ref(rows, model, "tent-step", r["batch"])
            xf = f"{r['rss_max'] / fwd['rss_max']:.2f}" if fwd else "-"
            xt = f"{r['rss_max'] / tent['rss_max']:.2f}" if tent else "-"
            cv = f" ({100 * r['wall_cv']:.0f} %)" if r.get("wall_cv") is not None else ""
            plan = r.get("memory_plan")
            ckpt = ", checkpointed" if plan and plan["checkpoint"] else ""
            note = f"; micro-batch {plan['micro_batch']}{ckpt}" if plan else ""
            lines.append(f"| {name} | {r['batch']} | {r['wall_median']:.1f}{cv} | {r['rss_max'] / gb:.2f} | {xf} | "
                         f"{xt} | {_passes(r.get('passes'), r.get('images'))}{note} | {r.get('verdict', '')} |")
        lines.append("")
    lines += ["## Before (issue 17, the code before this change)", "",
              "EfficientNet-Lite0, the same 432 site images (389 adapted), 2-core CPU, `/usr/bin/time`:", "",
              "| run | batch | wall s | peak RSS GB |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {b} | {w if w is not None else '-'} | {g} |" for m, b, w, g in BEFORE]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lite0", "builtin"], choices=sorted(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 16, 4])
    parser.add_argument("--site", type=Path, default=Path("/tmp/site_images"))
    parser.add_argument("--budget", help="also run gprebn with --max-memory BUDGET (e.g. 2GB)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; configurations are interleaved")
    parser.add_argument("--out", type=Path, default=RESULTS / "adapt_cost")
    parser.add_argument("--child", choices=("forward", "tent-step"), help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-data", help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                        help="only write --out from the rows of earlier runs' JSON files (one table per model)")
    args = parser.parse_args()
    if args.combine:
        parts = [json.loads(p.read_text()) for p in args.combine]
        payload = _payload(args, [r for p in parts for r in p["rows"]])
        payload["args"]["models"] = list(dict.fromkeys(m for p in parts for m in p["args"]["models"]))
        payload["combined"] = [{"file": str(p), "command": part["command"], "environment": part["environment"],
                                "partial": part.get("partial")} for p, part in zip(args.combine, parts, strict=True)]
        lines = markdown(payload) + ["", "Combined from:", ""]
        for c in payload["combined"]:
            partial = f" PARTIAL: {c['partial']}" if c["partial"] else ""
            lines.append(f"- `{c['command']}` ({c['environment']['date']}){partial}")
        publish(args.out, payload, lines)
        return
    if args.child:
        child(args.child, args.child_model, args.child_data, args.child_batch)
        return
    if "lite0" in args.models and not args.site.is_dir():
        sys.exit(f"{args.site} not found: make it with `python benchmarks/real_photos.py --write-site {args.site}` "
                 "(needs apt-get install python3-skimage opencv-doc)")
    cfgs = configs(args)
    results: list[list[dict[str, Any]]] = [[] for _ in cfgs]
    progress = ProgressLine("adapt_cost", len(cfgs) * args.repeat, unit="runs", every=30.0)
    done = 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for i, cfg in enumerate(cfgs):
                results[i].append(measure(cfg, Path(tmp)))
                done += 1
                progress.update(done)
                r = results[i][-1]
                print(f"{cfg['model']} {cfg['run']} b{cfg['batch']}{' ' + cfg['budget'] if cfg.get('budget') else ''}:"
                      f" {r['wall']:.1f} s, {r['rss'] / 1e9:.2f} GB{' FAILED ' + str(r['error']) if r['rc'] else ''}",
                      file=sys.stderr, flush=True)
                # what is measured so far, so that an interrupted run keeps it (marked partial)
                partial = _payload(args, [summarize(c, rs) for c, rs in zip(cfgs, results, strict=True) if rs])
                partial["partial"] = f"{done} of {len(cfgs) * args.repeat} runs"
                lines = markdown(partial) + ["", f"PARTIAL: {partial['partial']}", ""]
                write_results(args.out, partial, "\n".join([*lines, environment_line(partial["environment"]), ""]))
    progress.close()
    payload = _payload(args, [summarize(c, rs) for c, rs in zip(cfgs, results, strict=True)])
    publish(args.out, payload, markdown(payload))


def _payload(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, list) else v

    args_d = {k: plain(v) for k, v in vars(args).items() if not k.startswith("child")}
    return {"command": command_line(), "environment": environment(), "args": args_d, "rows": rows,
            "before": [dict(zip(("run", "batch", "wall_s", "peak_rss_gb"), b, strict=True)) for b in BEFORE]}


if __name__ == "__main__":
    main()
