"""Sections `step` and `step_compiled`: GpreBN step / Tent step and step / eval forward, eager and with
torch.compile (benchmarks/adapt_speed.py's interleaved rounds)."""

from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Callable
from typing import Any

from gpu_sections.harness import Case, Check, NotAvailable


def run(c: Check) -> None:
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


def run_compiled(c: Check) -> None:
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


