"""`demo`: the whole chain on built-in data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gprebn_edge.cli._app import (
    app,
    cli_errors,
    console,
    err_console,
    pct,
    progress,
)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's report.")] = Path("demo_out"),
    quick: Annotated[bool, typer.Option(help="Fewer images (for tests).")] = False,
    shifts: Annotated[str | None, typer.Option(help="Comma-separated built-in shifts at severity 5 ('style' is "
                                               "the natural-style shift); default: three noises, fog, contrast, "
                                               "style.")] = None,
) -> None:
    """The whole chain on built-in data: adapt the built-in model with GpreBN to corrupted images, export the
    unadapted and the adapted model as folded ONNX, compare and benchmark them with onnxruntime."""
    from gprebn_edge.demo import run_demo

    with cli_errors():
        previous = (out / "report.json").is_file()  # checked before any work, said after it
        with progress() as update:
            domains = tuple(s.strip() for s in shifts.split(",")) if shifts else None
            report = run_demo(out, quick=quick, domains=domains, progress=update)
        table = Table(title="error of the unadapted and adapted ONNX on held-out images (onnxruntime)")
        for col in ("shift", "unadapted", "adapted", "agree", "latency", "parity", "health"):
            table.add_column(col, justify="left" if col == "shift" else "right", no_wrap=True)
        for r in report["rows"]:
            table.add_row(r["domain"], pct(r["source_error"]), pct(r["adapted_error"]),
                          f"{100 * r['agreement']:.0f} %", f"{r['latency_ratio']:.3f}", f"{r['parity_max_rel']:.0e}",
                          r["health"])
        table.caption = ("agree: same top-1 class; latency: adapted / unadapted, interleaved; parity: max relative "
                         "logit error of ONNX vs PyTorch (top-1 agreement 100 % on every export); health: adapt's "
                         "check on held-back calibration images")
        console.print(table)
        for b in report["bench"]["rows"]:
            console.print(f"bench batch {b['batch']:>2}: p50 unadapted {b['unadapted_p50_ms']:.3f} ms, adapted "
                          f"{b['adapted_p50_ms']:.3f} ms, ratio {b['ratio_p50']:.3f}")
        t = report["tensorrt"]
        console.print(f"TensorRT: {t['status']}" + (f" ({t['reason']})" if t.get("reason") else ""), soft_wrap=True)
        console.print(f"report: {report['report']}  plots: {', '.join(report['plots'][:2])} (+ one per shift)  "
                      f"({report['seconds']:.1f} s)", soft_wrap=True)
        if previous:
            err_console.print(f"replaced the previous report in {out} (report.json, report.md, plots and one folder "
                              "per shift)", soft_wrap=True)
