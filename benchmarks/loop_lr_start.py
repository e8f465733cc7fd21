"""The lr x 1000 leg of benchmarks/loop_streams.py with its start checkpoint made two ways (issue 21).

The leg's criterion (every candidate caught) held at 96e27de and failed from 809a8d1 on. A bisect over the
54 commits between (only the leg, as here) put the change at 809a8d1, which made `adapt`'s refresh run
forwards of at most --batch-size images: the start checkpoint (GpreBN, batch 32, on 128 clean images) was
refreshed in forwards of 64 before and of 32 after. The refresh estimate is cumulative, yet each forward is
normalized with the estimate so far, so the statistics of later layers move slightly with the batching,
and the loop's 23 rounds then go another way. This script runs the leg from both starts with the same
loop code:

- "refresh forwards of 32": the start as `adapt` makes it now;
- "refresh forwards of 64": the start as it was made before 809a8d1 (adapt_and_freeze's no_grad_batch
  set to 64 while the start is made).

    OMP_NUM_THREADS=1 python benchmarks/loop_lr_start.py    # ~5 minutes on 2 cores
Writes benchmarks/results/loop_lr_start.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, environment, publish  # noqa: E402
from loop_streams import MODEL, loop_run, stream_segments  # noqa: E402

from gprebn_edge import adaptation  # noqa: E402
from gprebn_edge.adaptation import AdaptConfig, adapt_to_file  # noqa: E402


def make_start(path: Path, refresh_forward: int | None) -> None:
    """loop_streams' start checkpoint; `refresh_forward` overrides the images per refresh forward."""
    if refresh_forward is None:
        adapt_to_file(MODEL, "synthetic:clean:n=128", path, AdaptConfig(batch_size=32))
        return
    real = adaptation.adapt_and_freeze

    def with_forward(*args: Any, **kwargs: Any) -> Any:
        return real(*args, **{**kwargs, "no_grad_batch": refresh_forward})

    adaptation.adapt_and_freeze = with_forward  # type: ignore[assignment]
    try:
        adapt_to_file(MODEL, "synthetic:clean:n=128", path, AdaptConfig(batch_size=32))
    finally:
        adaptation.adapt_and_freeze = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "loop_lr_start")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kw = {"fps": 50.0, "every": 500, "buffer": 512, "window": 100, "lr": 1.0}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        spec, segments = stream_segments(1000)
        bounds = [(n, k * 1000, (k + 1) * 1000) for k, (n, _, _) in enumerate(segments)]
        for label, forward in (("refresh forwards of 32 (adapt now)", None),
                               ("refresh forwards of 64 (adapt before 809a8d1)", 64)):
            folder = Path(tmp) / str(forward)
            folder.mkdir()
            make_start(folder / "start.safetensors", forward)
            print(f"{label}:", flush=True)
            run = loop_run(folder / "state", spec, folder / "start.safetensors", bounds, **kw)
            runs.append({"start": label, **{k: run[k] for k in ("rounds", "passed", "swaps", "swapped_at",
                                                                 "fallbacks", "fallback_at", "rejection_reasons",
                                                                 "accuracy", "second_half")}})
    payload = {"command": command_line(), "environment": environment(), "loop": kw, "runs": runs}
    lines = ["# lr x 1000 leg of loop_streams from two start checkpoints (issue 21)", "",
             f"Command: `OMP_NUM_THREADS=1 {payload['command']}`", "",
             "The built-in stream (6 segments of 1000 frames) at lr 1.0, the loop as in loop_streams; only the "
             "start checkpoint differs (see the script's docstring). Criterion: every candidate caught (passed 0).",
             "", "| start | rounds | candidates passed | swaps (fallbacks) | served accuracy | second half: " +
             " / ".join(n for n, _, _ in bounds) + " |", "|---|---:|---:|---:|---:|---|"]
    for r in runs:
        halves = " / ".join("n/a" if v["accuracy"] is None else f"{100 * v['accuracy']:.1f}"
                            for v in r["second_half"].values())
        lines.append(f"| {r['start']} | {r['rounds']} | {r['passed']} | {r['swaps']} ({r['fallbacks']}) | "
                     f"{100 * (r['accuracy'] or 0):.1f} % | {halves} |")
    publish(args.out, payload, lines)


if __name__ == "__main__":
    main()
