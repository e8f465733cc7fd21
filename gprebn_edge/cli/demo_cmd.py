"""`demo`: the whole chain on built-in data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gprebn_edge.cli._app import command, console, err_console, progress
from gprebn_edge.cli.tables import demo_lines, demo_table


@command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's report.")] = Path("demo_out"),
    quick: Annotated[bool, typer.Option(help="Fewer images (for tests).")] = False,
    shifts: Annotated[str | None, typer.Option(help="Comma-separated built-in shifts at severity 5 ('style' is "
                                               "the natural-style shift); default: three noises, fog, contrast, "
                                               "style.")] = None,
) -> None:
    """The whole chain on built-in data: adapt the built-in model with GpreBN to corrupted images, export the
    unadapted and the adapted model as folded ONNX, compare and benchmark them with onnxruntime."""
    from gprebn_edge.demo import run_demo  # imports torch: without it, one line naming the extra

    previous = (out / "report.json").is_file()  # checked before any work, said after it
    with progress() as update:
        domains = tuple(s.strip() for s in shifts.split(",")) if shifts else None
        report = run_demo(out, quick=quick, domains=domains, progress=update)
    console.print(demo_table(report))
    for line in demo_lines(report):
        console.print(line, soft_wrap=True)
    if previous:
        err_console.print(f"replaced the previous report in {out} (report.json, report.md, plots and one folder "
                          "per shift)", soft_wrap=True)
