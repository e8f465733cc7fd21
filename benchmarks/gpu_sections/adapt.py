"""Section `adapt`: GpreBN on the built-in shift on the device and on the CPU (same data, seed, settings)."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

from gpu_sections.harness import Check


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

    from gprebn_edge.adaptation import calibration_tensors, run_online
    from gprebn_edge.methods import make_adapter

    torch.manual_seed(config.seed)
    adapter = make_adapter(config.method, copy.deepcopy(model).to(device), **config.adapter_kwargs())
    online = run_online(_OnDevice(adapter, device), source, config.batch_size)  # type: ignore[arg-type]
    freeze = config.freeze or adapter.freeze_modes[0]
    static = adapter.freeze(freeze, lambda: (t.to(device) for t in calibration_tensors(source, config.refresh_batch)))
    return static.cpu().eval(), {**online, "freeze": freeze}


def run(c: Check) -> None:
    """GpreBN on the built-in shift on the device and on the CPU (same data, seed and settings); the frozen
    models' test error must agree within noise: 2*sqrt(2) binomial standard errors (two independent runs'
    95 % band; the runs share their data, so this bound is loose, and it is reported beside the figures)."""
    import torch

    from gprebn_edge.adaptation import AdaptConfig, adapt_and_freeze, evaluate

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


