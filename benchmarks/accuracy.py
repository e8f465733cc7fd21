"""The built-in shift benchmark: methods x domains x calibration batch sizes.

For each cell: (a) the online error on the calibration stream (predictions made while adapting), and
(b) the deployed error: the frozen static model on a disjoint held-out test split of the same domain.
The static model is an eval-mode BN model, so its predictions do not depend on the batch they are
computed in: evaluating it in batches of 256 gives exactly the batch-1 predictions, only faster.

    python benchmarks/accuracy.py                       # the full grid (~40 min on 2 cores)
    python benchmarks/accuracy.py --domains gaussian_noise,fog --batch-sizes 64,1 --out /tmp/sweep
Writes benchmarks/results/accuracy.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import mean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, environment, environment_line, write_results  # noqa: E402

from gprebn_edge.adaptation import AdaptConfig, adapt_and_freeze, evaluate  # noqa: E402
from gprebn_edge.data.corruptions import CORRUPTIONS  # noqa: E402
from gprebn_edge.data.sources import ImageSource, open_source  # noqa: E402
from gprebn_edge.methods import METHODS, StatsConfig  # noqa: E402
from gprebn_edge.models.spec import load_model  # noqa: E402


def domain_list(names: list[str], severities: list[int],
                named: tuple[str, ...] = ("clean", "style")) -> list[tuple[str, int | None]]:
    """(domain, severity) pairs: every severity of each corruption, None for the `named` domains."""
    out: list[tuple[str, int | None]] = []
    for name in names:
        if name in named:
            out.append((name, None))
        else:
            out.extend((name, s) for s in severities)
    return out


# (domain, severity) -> (calibration source, disjoint test source) of that domain
DataFactory = Callable[[str, int | None], tuple[ImageSource, ImageSource]]


def synthetic_data(n_calib: int, n_test: int, preprocess, data_seed: int = 0) -> DataFactory:
    """The built-in generated images: the calib and test splits of one domain."""
    def data(domain: str, severity: int | None) -> tuple[ImageSource, ImageSource]:
        sev = f":{severity}" if severity else ""
        calib = open_source(f"synthetic:{domain}{sev}:n={n_calib}:split=calib:seed={data_seed}", preprocess)
        test = open_source(f"synthetic:{domain}{sev}:n={n_test}:split=test:seed={data_seed}", preprocess)
        return calib, test
    return data


def run_cell(model, method: str, domain: str, severity: int | None, batch: int, config: AdaptConfig,
             data: DataFactory) -> dict:
    calib, test = data(domain, severity)
    start = time.perf_counter()
    # a freeze mode the method lacks (e.g. --freeze direct for bn) falls back to the method's own
    freeze = config.freeze if config.freeze in METHODS[method].freeze_modes else None
    cell_config = dataclasses.replace(config, method=method, batch_size=batch, freeze=freeze)
    static, online, _ = adapt_and_freeze(model, calib, cell_config)
    seconds = time.perf_counter() - start
    deployed = evaluate(static, test)
    return {"method": method, "domain": domain, "severity": severity, "batch": batch, "freeze": online["freeze"],
            "online_error": online["online_error"], "deployed_error": deployed["error"],
            "deployed_entropy": deployed["entropy"], "seconds": round(seconds, 2)}


def run_grid(model, domains: list[tuple[str, int | None]], methods: list[str], batches: list[int],
             config: AdaptConfig, data: DataFactory) -> list[dict]:
    """Every (domain, method, batch) cell, printing each as it finishes."""
    cells: list[dict] = []
    start = time.perf_counter()
    for domain, sev in domains:
        for method in methods:
            for b in batches:
                if method == "source" and b != batches[0]:  # no adaptation: the same at every batch size
                    cells.append({**cells[-1], "batch": b, "seconds": 0.0})
                    continue
                cells.append(run_cell(model, method, domain, sev, b, config, data))
                c = cells[-1]
                print(f"[{time.perf_counter() - start:6.0f}s] {domain}{'-' + str(sev) if sev else ''} {method} "
                      f"@{b}: online {100 * c['online_error']:.2f} %, deployed {100 * c['deployed_error']:.2f} %",
                      flush=True)
    return cells


def summarize(cells: list[dict], methods: list[str], batches: list[int], severities: list[int],
              named: tuple[str, ...] = ("style", "clean")) -> dict:
    """Mean over corruptions per (method, batch, severity), plus each of the `named` domains alone."""
    rows = {}
    for m in methods:
        for b in batches:
            sel = [c for c in cells if c["method"] == m and c["batch"] == b]
            row = {}
            for s in severities:
                cs = [c for c in sel if c["severity"] == s]
                if cs:
                    row[f"sev{s}"] = {k: mean(c[k] for c in cs) for k in ("online_error", "deployed_error")}
            for d in named:
                cs = [c for c in sel if c["domain"] == d]
                if cs:
                    row[d] = {k: cs[0][k] for k in ("online_error", "deployed_error")}
            rows[f"{m}@{b}"] = row
    return rows


def markdown(payload: dict, title: str = "Built-in shift benchmark", model: str = "builtin:small_resnet",
             notes: tuple[str, ...] = ()) -> str:
    s, a = payload["summary"], payload["args"]
    cols = [k for k in next(iter(s.values()))]
    lines = [f"# {title}", "", f"Command: `{payload['command']}`", "",
             f"Model {model}; {a['n_calib']} calibration images per domain (one online pass), "
             f"{a['n_test']} held-out test images; errors in %. Online = predictions made while adapting; "
             "deployed = the frozen static model on the held-out split. Means over the "
             f"{len(a['corruptions'])} corruptions per severity.", "", *notes,
             "| method | batch | " + " | ".join(f"{c} online | {c} deployed" for c in cols) + " |",
             "|---|---:|" + "---:|---:|" * len(cols)]
    for key, row in s.items():
        m, b = key.split("@")
        cells = []
        for c in cols:
            v = row.get(c)
            cells += [f"{100 * v['online_error']:.2f}", f"{100 * v['deployed_error']:.2f}"] if v else ["-", "-"]
        lines.append(f"| {m} | {b} | " + " | ".join(cells) + " |")
    lines += ["", "## Per domain (deployed error %, online in parentheses)", ""]
    batches = payload["args"]["batch_sizes"]
    methods = payload["args"]["methods"]
    for b in batches:
        lines += [f"### calibration batch {b}", "", "| domain | " + " | ".join(methods) + " |",
                  "|---|" + "---:|" * len(methods)]
        keys = sorted({(c["domain"], c["severity"] or 0) for c in payload["cells"]}, key=lambda t: (-t[1], t[0]))
        for d, sev in keys:
            vals = []
            for m in methods:
                c = next((c for c in payload["cells"] if c["method"] == m and c["batch"] == b
                          and c["domain"] == d and (c["severity"] or 0) == sev), None)
                vals.append(f"{100 * c['deployed_error']:.1f} ({100 * c['online_error']:.1f})" if c else "-")
            lines.append(f"| {d}{'-' + str(sev) if sev else ''} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += [environment_line(payload["environment"]), ""]
    return "\n".join(lines)


def add_config_args(ap: argparse.ArgumentParser) -> None:
    """The grid and adaptation options every accuracy benchmark takes (domains and sizes are its own)."""
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--severities", default="5,3")
    ap.add_argument("--batch-sizes", default="64,16,4,1")
    ap.add_argument("--lr", type=float, default=AdaptConfig.lr)
    ap.add_argument("--optimizer", default=AdaptConfig.optimizer)
    ap.add_argument("--lr-scaling", default=AdaptConfig.lr_scaling)
    ap.add_argument("--momentum", default="cumulative")
    ap.add_argument("--theta", type=float, default=1.0)
    ap.add_argument("--stats-init", default="first")
    ap.add_argument("--stats-order", default="before")
    ap.add_argument("--freeze", default=None, help="refresh or direct (default: each method's own)")
    ap.add_argument("--threads", type=int, default=2)


def config_from_args(args: argparse.Namespace) -> AdaptConfig:
    momentum = None if args.momentum == "cumulative" else float(args.momentum)
    return AdaptConfig(lr=args.lr, optimizer=args.optimizer, lr_scaling=args.lr_scaling, freeze=args.freeze,
                       stats=StatsConfig(momentum, args.theta, args.stats_init, args.stats_order))


def grid_lists(args: argparse.Namespace) -> tuple[list[str], list[int], list[int]]:
    """--methods, --batch-sizes and --severities as lists."""
    return (args.methods.split(","), [int(b) for b in args.batch_sizes.split(",")],
            [int(s) for s in args.severities.split(",")])


def grid_payload(run_args: dict, start: float, cells: list[dict], named: tuple[str, ...] = ("style", "clean")) -> dict:
    """What a grid run writes: the command, its arguments, the environment, the summary and every cell."""
    return {
        "command": command_line(),
        "args": run_args,
        "environment": environment(),
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summarize(cells, run_args["methods"], run_args["batch_sizes"], run_args["severities"], named),
        "cells": cells,
    }


def config_dict(config: AdaptConfig) -> dict:
    return {**{k: v for k, v in vars(config).items() if k != "stats"}, "stats": config.stats.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default=",".join(["clean", "style", *CORRUPTIONS]))
    ap.add_argument("--n-calib", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the generated images (a replicate)")
    ap.add_argument("--out", type=Path, default=RESULTS / "accuracy")
    add_config_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    methods, batches, severities = grid_lists(args)
    config = config_from_args(args)
    loaded = load_model("builtin:small_resnet")
    domains = domain_list(args.domains.split(","), severities)
    start = time.perf_counter()
    data = synthetic_data(args.n_calib, args.n_test, loaded.preprocess, args.data_seed)
    cells = run_grid(loaded.model, domains, methods, batches, config, data)
    payload = grid_payload({"methods": methods, "batch_sizes": batches, "severities": severities,
                            "corruptions": [d for d in args.domains.split(",") if d not in ("clean", "style")],
                            "n_calib": args.n_calib, "n_test": args.n_test, "data_seed": args.data_seed,
                            "config": config_dict(config)}, start, cells)
    md = markdown(payload)
    write_results(args.out, payload, md)
    print(md)


if __name__ == "__main__":
    main()
