"""GpreBN's batch-size robustness across data seeds: the severity-5 means of benchmarks/results/accuracy.json
(data seed 0) and of each benchmarks/results/replicates/gprebn_seed*.json (made by accuracy.py with
--methods gprebn --batch-sizes 64,4,1 --data-seed N), side by side, with each batch size's deployed and
online error relative to batch 64, per seed and for the mean over seeds.

    python benchmarks/summarize_replicates.py
Writes benchmarks/results/replicates/summary.json and .md."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, write_results  # noqa: E402

BATCHES = (64, 4, 1)


def load(path: Path) -> dict[int, dict[str, float]]:
    summary = json.loads(path.read_text())["summary"]
    return {b: summary[f"gprebn@{b}"]["sev5"] for b in BATCHES}


def main() -> None:
    runs = {0: load(RESULTS / "accuracy.json")}
    for path in sorted((RESULTS / "replicates").glob("gprebn_seed*.json")):
        runs[int(re.search(r"seed(\d+)", path.name).group(1))] = load(path)
    runs = dict(sorted(runs.items()))
    mean_run = {b: {k: mean(r[b][k] for r in runs.values()) for k in ("deployed_error", "online_error")}
                for b in BATCHES}
    rows = [*((f"seed {s}", r) for s, r in runs.items()), (f"mean of {len(runs)} seeds", mean_run)]
    lines = ["# GpreBN across data seeds: severity-5 mean error (%) and change relative to batch 64", "",
             f"Command: `{command_line()}`", "",
             "| data | deployed b64 | b4 (vs b64) | b1 (vs b64) | online b64 | b4 (vs b64) | b1 (vs b64) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    out = {}
    for name, r in rows:
        cells = []
        for key in ("deployed_error", "online_error"):
            base = r[64][key]
            cells.append(f"{100 * base:.2f}")
            cells += [f"{100 * r[b][key]:.2f} ({100 * (r[b][key] / base - 1):+.1f} %)" for b in (4, 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        out[name] = r
    lines += ["", "Criterion of issue 2: deployed within 5 % and online within 10 % of batch 64, at batches 4 and 1.",
              ""]
    write_results(RESULTS / "replicates" / "summary", {"command": command_line(), "runs": out}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
