"""Summarize benchmarks/results/sweeps/*.json (made by sweep_defaults.sh) into one table:
per configuration and calibration batch, the mean online and deployed error over the shifted domains,
and the clean-domain deployed error. Writes benchmarks/results/sweeps/summary.md.

    python benchmarks/summarize_sweeps.py"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402

from gprebn_edge.io import write_text_atomic  # noqa: E402


def main() -> None:
    folder = RESULTS / "sweeps"
    lines = ["# GpreBN settings sweep (built-in model, severity 5, 2,000 calibration / 2,000 test images)", "",
             "Shifted = mean over the shifted domains of the sweep (noise x4, fog, contrast, style). Errors in %.",
             "Made by `benchmarks/sweep_defaults.sh`; this table by `python benchmarks/summarize_sweeps.py`.", "",
             "| config | batch | shifted online | shifted deployed | clean deployed | deployed vs batch 64 |",
             "|---|---:|---:|---:|---:|---:|"]
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        cells = data["cells"]
        base = None
        for b in data["args"]["batch_sizes"]:
            shifted = [c for c in cells if c["batch"] == b and c["domain"] != "clean"]
            clean = [c for c in cells if c["batch"] == b and c["domain"] == "clean"]
            dep = mean(c["deployed_error"] for c in shifted)
            base = dep if base is None else base
            lines.append(f"| {path.stem} | {b} | {100 * mean(c['online_error'] for c in shifted):.2f} | "
                         f"{100 * dep:.2f} | {100 * clean[0]['deployed_error']:.2f} | "
                         f"{100 * (dep / base - 1):+.1f} % |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(folder / "summary.md", text)
    print(text)


if __name__ == "__main__":
    main()
