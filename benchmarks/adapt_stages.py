"""Where `adapt`'s memory goes, stage by stage (issue 17): one fresh process per method runs
gprebn_edge.adaptation.adapt_to_file with its stages wrapped; before and after each, the process's resident
size and its peak since the previous mark (the kernel's high-water mark, reset between marks by writing 5 to
/proc/self/clear_refs; Linux only).

    python benchmarks/adapt_stages.py --methods source adabn --batch 4    # ~1 minute on 2 cores
Writes benchmarks/results/adapt_stages.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, environment, publish  # noqa: E402

LITE0 = str(ROOT / "examples" / "efficientnet_lite0.py") + ":make_model"
STAGES = ("load_model", "open_source", "probe_input", "split_holdout", "adapt_and_freeze", "release_memory",
          "check_health", "held_logits", "statistics_shift", "save_checkpoint")


def _status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def child(method: str, batch: int, model: str, data: str) -> None:
    """In this (fresh) process: adapt with every stage wrapped; print the marks as JSON lines."""
    marks: list[dict[str, Any]] = []

    def mark(name: str) -> None:
        s = _status()
        marks.append({"mark": name, "rss_mb": round(s["VmRSS"]), "peak_since_last_mb": round(s["VmHWM"])})
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark

    mark("start")
    from gprebn_edge import adaptation

    mark("imports")
    for name in STAGES:
        real = getattr(adaptation, name)

        def wrapped(*a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
            mark(f"before {_name}")
            result = _real(*a, **k)
            mark(f"after {_name}")
            return result

        setattr(adaptation, name, functools.wraps(real)(wrapped))
    with tempfile.TemporaryDirectory() as tmp:
        adaptation.adapt_to_file(model, data, Path(tmp) / "out.safetensors",
                                 adaptation.AdaptConfig(method=method, batch_size=batch), force=True)
    mark("end")
    print(json.dumps(marks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["source", "adabn"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--model", default=LITE0)
    ap.add_argument("--data", default="/tmp/site_images")
    ap.add_argument("--out", type=Path, default=RESULTS / "adapt_stages")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.batch, args.model, args.data)
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("needs Linux's /proc/self/clear_refs")
    runs = {}
    for method in args.methods:
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--batch", str(args.batch), "--model",
                               args.model, "--data", args.data], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"{method}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'failed'}")
        runs[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    payload = {"command": command_line(), "environment": environment(), "model": args.model, "data": args.data,
               "batch": args.batch, "runs": runs}
    lines = ["# `adapt`'s memory stage by stage", "", f"`{payload['command']}`", "",
             f"Model `{Path(args.model).name}`, data `{args.data}`, batch {args.batch}. Per method: the process's "
             "resident size at each mark and its peak since the previous mark (MB).", ""]
    for method, marks in runs.items():
        lines += [f"## {method}", "", "| mark | RSS MB | peak since the last mark MB |", "|---|---:|---:|"]
        lines += [f"| {m['mark']} | {m['rss_mb']} | {m['peak_since_last_mb']} |" for m in marks]
        lines += ["", f"Peak of the run: {max(m['peak_since_last_mb'] for m in marks)} MB.", ""]
    publish(args.out, payload, lines)


if __name__ == "__main__":
    main()
