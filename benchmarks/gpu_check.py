"""One command that checks the GPU path: install, GPU tests, CUDA parity, adapt on CUDA, latency, GpreBN step
cost, the TensorRT engine path (strongly typed fp32/fp16/int8 engines from the ONNX files, refit, runs) and
onnxruntime's GPU providers where present. Built for a GPU machine lent for minutes: every section has a
time budget, results are rewritten (JSON + markdown, atomically) after each section and each row, so a kill
keeps what finished, and a failing section is recorded in one line while the next one runs. The sections
are modules of benchmarks/gpu_sections/; this file parses the command line and runs them.

    python benchmarks/gpu_check.py                           # one GPU, ends within ~7 minutes
    python benchmarks/gpu_check.py --out $OUT/gpu            # the device tool: results come back in $OUT
    python benchmarks/gpu_check.py --device cpu --quick      # the CPU dry run (CI), under a minute

Writes OUT/gpu_check.json and OUT/gpu_check.md (default OUT: benchmarks/results/gpu/). Exit status: 0 when no
section failed, 1 when one did, 2 when the machine lacks what the check needs (one line says what), 130/143
when interrupted (partial results are kept). Runs from the working tree without installing: the package's
`gprebn_edge.export`/`gprebn_edge.runtime` folders are mapped here as setuptools' package-dir does."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_sections, adapt_speed, _common
from gpu_sections import ORDER  # noqa: E402  (imports nothing of gprebn_edge)


def use_tree() -> str:
    """Import gprebn_edge from this working tree; map export/ and runtime/ to gprebn_edge.export/.runtime
    where no install does it. Returns how the package was found."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import gprebn_edge

    how = f"installed ({Path(gprebn_edge.__file__).parent})"
    for sub in ("export", "runtime"):
        name = f"gprebn_edge.{sub}"
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(name, ROOT / sub / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / sub)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(gprebn_edge, sub, module)
        how = f"working tree {ROOT} (not installed; export/ and runtime/ mapped)"
    return how


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the dry run)")
    ap.add_argument("--quick", action="store_true", help="small models, few images and rounds (the CPU dry run)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default %(default)s)")
    ap.add_argument("--budget", type=float, default=None, help="total seconds (default 420; 50 with --quick)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 with --quick, for a CPU shared with other jobs)")
    ap.add_argument("--sections", default="", help="comma-separated subset to run (install always runs)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile step timing")
    ap.add_argument("--pip-install", action="store_true",
                    help="also run pip install --no-deps --no-build-isolation -e . (changes this Python's packages)")
    args = ap.parse_args(argv)
    args.budget = args.budget or (50.0 if args.quick else 420.0)
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = args.sections - set(ORDER)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(ORDER)}")
    if not (args.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", args.device)):
        ap.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    if args.threads is None and args.quick:
        args.threads = 1
    tree = use_tree()
    from gpu_sections import sections
    from gpu_sections.harness import Check, Report, Stopped, on_alarm, on_stop, run_section

    report = Report(args.out, {"command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
                               "device": args.device, "quick": args.quick, "budget_s": args.budget,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "environment": {}})
    c = Check(args, report)
    c.tree = tree
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGALRM, on_alarm)
    status = 0
    try:
        for name, fn in sections():
            run_section(c, name, fn)
        failed = [n for n, s in report.data["sections"].items() if s["status"] == "failed"]
        status = 1 if failed else 0
        c.say(f"done: {'failed: ' + ', '.join(failed) if failed else 'no section failed'}")
    except SystemExit as e:  # install: the machine lacks something; one line says what
        print(e.code, file=sys.stderr, flush=True)
        report.data["sections"]["install"].update(status="failed", reason=str(e.code))
        status = 2
    except Stopped as e:
        status = 143 if str(e) == "SIGTERM" else 130
        c.say(f"stopped by {e}: partial results kept")
    finally:
        report.data["seconds"] = round(time.perf_counter() - c.start, 1)
        report.data["exit_status"] = status
        report.save()
        c.say(f"results: {args.out / 'gpu_check.json'} and gpu_check.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
