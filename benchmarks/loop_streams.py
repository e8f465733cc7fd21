"""The device loop against its two static baselines, segment by segment, on two streams (issue 11):

- "shifting": the built-in stream (clean -> fog -> gaussian noise -> contrast -> shot noise -> clean, severity 5);
- "collapse": clean frames, then the same kind of frames under-exposed to EXPOSURE (x' = EXPOSURE * x), then
  frames behind vertical stripes (x' = (1 - STRIPES) x + STRIPES s, s alternating 0/1 every 2 pixel columns),
  then clean frames again (float frames in [0, 1] written to an .npz with their labels). On the two shifted
  segments the unadapted model puts nearly every frame in one class (behind the stripes with almost no
  entropy) and AdaBN (BN statistics re-estimated on the new frames) recovers it. The evidence is printed.

Per segment, online accuracy over its SECOND half (the frames after the loop has had half a segment to react)
of (i) the loop, (ii) the unadapted source model, (iii) the source model GpreBN-adapted once on the segment's
first half (the frames the loop saw before). Criteria: loop >= once-adapted - 3 points and loop >= unadapted -
1 point on every segment. Per stream: rounds by trigger (shift / cadence), swaps, rejections counted by gate,
errors, rollbacks. Then the built-in stream with lr x 1000 (every candidate must be caught), and the serving
latency p99 idle vs while a round runs, from the loop's own log, as idle as the machine gets and with one
busy-loop process per CPU.

    OMP_NUM_THREADS=1 python benchmarks/loop_streams.py    # ~12 minutes on 2 cores
Writes benchmarks/results/loop_streams.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, environment, publish  # noqa: E402

from gprebn_edge.adaptation import AdaptConfig, adapt_and_freeze, adapt_to_file  # noqa: E402
from gprebn_edge.data.arrays import ArraySource  # noqa: E402
from gprebn_edge.data.domains import load_domain  # noqa: E402
from gprebn_edge.data.preprocess import Preprocess  # noqa: E402
from gprebn_edge.data.stream import DEFAULT_SEGMENTS, ShiftingStream  # noqa: E402
from gprebn_edge.device.loop import LoopConfig, run_loop  # noqa: E402
from gprebn_edge.device.metrics_log import LoopLog  # noqa: E402
from gprebn_edge.device.report import read_log, summarize  # noqa: E402
from gprebn_edge.methods.base import entropy  # noqa: E402
from gprebn_edge.models.spec import load_model  # noqa: E402

MODEL = "builtin:small_resnet"
EXPOSURE = 0.05          # the collapse stream's dark segment: 5 % of the clean exposure
STRIPES = 0.15           # and the weight of the stripes in front of its striped segment
ONCE_TOLERANCE = 3.0     # points the loop may trail the once-adapted model by on a segment
UNADAPTED_TOLERANCE = 1.0  # points the loop may trail the unadapted model by on a segment


# -- the frames ------------------------------------------------------------------------------------------
def stream_segments(frames: int, seed: int = 0) -> tuple[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """The built-in stream's spec and its segments (name, uint8 NHWC frames, labels), exactly as served."""
    spec = "stream:" + ",".join(f"{tok.split('*')[0]}*{frames}" for tok in DEFAULT_SEGMENTS.split(",")) + \
        f":seed={seed}"
    source = ShiftingStream(spec, Preprocess.from_dict(load_model(MODEL).preprocess.to_dict()))
    return spec, [(f"{s.name}#{k}", *source.segment_arrays(k)) for k, s in enumerate(source.segments())]


def collapse_segments(frames: int, exposure: float = EXPOSURE, stripes: float = STRIPES,
                      seed: int = 7) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Clean frames, other clean glyphs under-exposed, others behind stripes, clean again (float32 in [0, 1], so
    nothing is quantized away)."""
    parts = [load_domain("clean", split="test", n=frames, seed=seed + k) for k in range(4)]
    x = [a.astype(np.float32) / 255.0 for a, _ in parts]
    columns = (np.arange(x[2].shape[2]) // 2 % 2).astype(np.float32)[None, None, :, None]  # NHWC: 2 on, 2 off
    shifted = [x[1] * exposure, (1.0 - stripes) * x[2] + stripes * columns]
    return [("clean#0", x[0], parts[0][1]), (f"exposure-{exposure:g}#1", shifted[0], parts[1][1]),
            (f"stripes-{stripes:g}#2", shifted[1], parts[2][1]), ("clean#3", x[3], parts[3][1])]


def write_npz(segments: list[tuple[str, np.ndarray, np.ndarray]], path: Path) -> Path:
    np.savez(path, images=np.concatenate([s[1] for s in segments]), labels=np.concatenate([s[2] for s in segments]))
    return path


# -- offline baselines (torch, one thread) -----------------------------------------------------------------
def _source(images: np.ndarray, labels: np.ndarray, preprocess: Preprocess) -> ArraySource:
    return ArraySource(images, labels, "frames", preprocess, name="frames", shuffle=False, seed=0, limit=None)


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, preprocess: Preprocess) -> dict:
    """Accuracy, top-class share and mean entropy (nats) of an eval-mode model on the frames."""
    model.eval()
    logits = torch.cat([model(torch.from_numpy(b.images)) for b in _source(images, labels, preprocess).batches(256)])
    pred = logits.argmax(1).numpy()
    counts = np.bincount(pred, minlength=logits.shape[1])
    return {"accuracy": float((pred == labels).mean()), "top_class": int(counts.argmax()),
            "top_share": float(counts.max() / len(pred)), "mean_entropy": float(entropy(logits).mean()),
            "max_entropy": float(np.log(logits.shape[1]))}


def once_adapted(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, preprocess: Preprocess,
                 method: str = "gprebn") -> torch.nn.Module:
    """A copy of the source model adapted once (one online pass, then frozen) on the frames, in their order."""
    static, _, _ = adapt_and_freeze(copy.deepcopy(model), _source(images, labels, preprocess),
                                    AdaptConfig(method=method))
    return static


def baselines(segments: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Per segment, on its second half: the unadapted source model and the source model GpreBN-adapted once on
    the first half."""
    loaded = load_model(MODEL)
    out = {}
    for name, images, labels in segments:
        half = len(images) // 2
        first, second = (images[:half], labels[:half]), (images[half:], labels[half:])
        t0 = time.perf_counter()
        adapted = once_adapted(loaded.model, *first, loaded.preprocess)
        out[name] = {"unadapted": predict(loaded.model, *second, loaded.preprocess),
                     "once_adapted": predict(adapted, *second, loaded.preprocess),
                     "adapt_seconds": round(time.perf_counter() - t0, 2)}
        print(f"  {name}: unadapted {100 * out[name]['unadapted']['accuracy']:.1f} %, once-adapted "
              f"{100 * out[name]['once_adapted']['accuracy']:.1f} %", flush=True)
    return out


def collapse_evidence(segment: tuple[str, np.ndarray, np.ndarray]) -> dict[str, Any]:
    """The unadapted model on the whole collapse segment, and AdaBN fitted on its first half, scored on its
    second."""
    loaded = load_model(MODEL)
    _, images, labels = segment
    half = len(images) // 2
    adabn = once_adapted(loaded.model, images[:half], labels[:half], loaded.preprocess, method="adabn")
    return {"unadapted": predict(loaded.model, images, labels, loaded.preprocess),
            "unadapted_second_half": predict(loaded.model, images[half:], labels[half:], loaded.preprocess),
            "adabn_second_half": predict(adabn, images[half:], labels[half:], loaded.preprocess)}


# -- the loop ---------------------------------------------------------------------------------------------
def second_half_accuracy(windows: list[dict[str, Any]], bounds: list[tuple[str, int, int]]) -> dict[str, Any]:
    """Online accuracy over each segment's second half from the log's window records ([frames - n, frames)
    each); a window that straddles a half's boundary is not counted (choose `window` dividing half a segment)."""
    out: dict[str, Any] = {}
    for name, start, stop in bounds:
        lo = start + (stop - start) // 2
        correct = labeled = 0
        for w in windows:
            a, b = int(w["frames"]) - int(w["n"]), int(w["frames"])
            if lo <= a and b <= stop and w.get("labeled"):
                correct += int(w["correct"])
                labeled += int(w["labeled"])
        out[name] = {"accuracy": correct / labeled if labeled else None, "labeled": labeled}
    return out


def round_stats(log: LoopLog) -> dict[str, Any]:
    """The round counts as `loop-report` counts them (device/report.summarize: rounds, passed, rejected,
    errors, triggers, rejection reasons, swaps, rollbacks), plus what only this benchmark tabulates: the
    timeline of rounds, the frames of the swaps and the shift detections."""
    summary = summarize(log)
    records = log.records
    rounds = [r for r in records if r["event"] == "round"]
    return {
        **{k: summary[k] for k in ("rounds", "passed", "rejected", "errors", "triggers", "rejection_reasons",
                                   "swaps", "rollbacks", "fallbacks")},
        "error_messages": [r.get("error") for r in rounds if r.get("error") is not None][:5],
        "shift_detections": [{"frames": r["frames"], "reason": r["reason"]} for r in records if r["event"] == "shift"],
        "timeline": [{"round": r["round"], "frames": r.get("frames"), "trigger": r.get("trigger"),
                      "outcome": r.get("outcome"), "seconds": r.get("seconds"),
                      "reasons": r.get("reasons") or ([r["error"]] if r.get("error") else []),
                      "gates": r.get("gates")} for r in rounds],
        "swapped_at": [r["frames"] for r in records if r["event"] == "swap"],
        "fallback_at": [r["frames"] for r in records if r["event"] == "fallback"],
    }


def loop_run(state: Path, source: str, start: Path, bounds: list[tuple[str, int, int]], **kw: Any) -> dict[str, Any]:
    config = LoopConfig(state=state, source=source, model=start, adapt_threads=1, serve_threads=1, **kw)
    t0 = time.perf_counter()
    result = run_loop(config)
    log = read_log(result.log)
    summary = summarize(log)
    windows = [r for r in log.records if r["event"] == "window"]
    run = {"seconds": round(time.perf_counter() - t0, 1), "frames": result.frames,
           "served_only_passed": summary["served_only_passed"], "accuracy": summary["accuracy"],
           "latency_ms": summary["latency_ms"], "second_half": second_half_accuracy(windows, bounds),
           **round_stats(log)}
    print(f"  {run['frames']} frames in {run['seconds']} s: rounds {run['rounds']} {run['triggers']}, swaps "
          f"{run['swaps']}, rejected {run['rejection_reasons']}, errors {run['errors']}", flush=True)
    return run


def _busy(deadline: float) -> None:
    x = 0
    while time.monotonic() < deadline:
        x += 1


@contextmanager
def cpu_hog(n: int, timeout: float) -> Iterator[None]:
    """n busy-loop processes, each ending by itself after `timeout` seconds, terminated on exit."""
    procs = [mp.Process(target=_busy, args=(time.monotonic() + timeout,), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# -- tables -----------------------------------------------------------------------------------------------
def segment_rows(run: dict[str, Any], base: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    rows, lines = [], ["| segment | loop | unadapted | once-adapted | loop - once | loop - unadapted | pass |",
                       "|---|---:|---:|---:|---:|---:|---|"]
    for name, b in base.items():
        loop = run["second_half"][name]["accuracy"]
        un, once = 100 * b["unadapted"]["accuracy"], 100 * b["once_adapted"]["accuracy"]
        lp = None if loop is None else 100 * loop
        ok_once = lp is not None and lp >= once - ONCE_TOLERANCE
        ok_un = lp is not None and lp >= un - UNADAPTED_TOLERANCE
        rows.append({"segment": name, "loop": lp, "unadapted": un, "once_adapted": once, "pass_once": ok_once,
                     "pass_unadapted": ok_un})
        verdict = "pass" if ok_once and ok_un else "**FAIL** (" + ", ".join(
            w for w, ok in (("vs once-adapted", ok_once), ("vs unadapted", ok_un)) if not ok) + ")"
        lines.append(f"| {name} | {_f(lp)} | {un:.1f} | {once:.1f} | {_d(lp, once)} | {_d(lp, un)} | {verdict} |")
    return rows, lines


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _d(a: float | None, b: float) -> str:
    return "n/a" if a is None else f"{a - b:+.1f}"


def round_lines(run: dict[str, Any]) -> list[str]:
    reasons = ", ".join(f"{k} x{v}" for k, v in sorted(run["rejection_reasons"].items())) or "none"
    trig = ", ".join(f"{k} {v}" for k, v in sorted(run["triggers"].items()) if v) or "none"
    lines = [f"Rounds {run['rounds']} (by trigger: {trig}); passed {run['passed']}, swaps {run['swaps']} (at frames "
             f"{run['swapped_at']}); rejected {run['rejected']} (failed gates, counted by gate: {reasons}); errors "
             f"{run['errors']}; rollbacks {run['rollbacks']}; fallbacks to the start model "
             f"{run.get('fallbacks', 0)} (at frames {run.get('fallback_at', [])}); served only candidates that passed: "
             f"{run['served_only_passed']}; online accuracy over the whole run {_f(100 * (run['accuracy'] or 0))} %.",
             "", "| round | frame | trigger | outcome | s | reasons |", "|---:|---:|---|---|---:|---|"]
    for r in run["timeline"]:
        why = "; ".join(r["reasons"]).replace("|", "\\|")
        lines.append(f"| {r['round']} | {r['frames']} | {r['trigger']} | {r['outcome']} | {r['seconds']} | "
                     f"{why[:300]} |")
    return lines


def latency_line(label: str, run: dict[str, Any]) -> str:
    lat = run["latency_ms"]
    cells = []
    for key in ("idle", "adapting"):
        v = lat[key] or {}
        cells += [str(v.get("n", 0)), f"{v.get('p50', float('nan')):.3f}", f"{v.get('p99', float('nan')):.3f}"]
    ratio = lat["ratio"]["p99"]
    return f"| {label} | " + " | ".join(cells) + f" | {'n/a' if ratio is None else f'{ratio:.2f}x'} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1000, help="frames per segment")
    ap.add_argument("--fps", type=float, default=50.0, help="the rate frames are served at, like a camera")
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--buffer", type=int, default=512)
    ap.add_argument("--window", type=int, default=100, help="frames per metrics record (must divide frames / 2)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["lr", "hog"], help="runs to leave out")
    ap.add_argument("--out", type=Path, default=RESULTS / "loop_streams")
    args = ap.parse_args()
    if (args.frames // 2) % args.window:
        ap.error("--window must divide --frames / 2")
    torch.set_num_threads(1)
    loop_kw = {"fps": args.fps, "every": args.every, "buffer": args.buffer, "window": args.window}
    payload: dict[str, Any] = {"command": command_line(), "environment": environment(), "frames": args.frames,
                               **loop_kw, "streams": {}, "load_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = folder / "start.safetensors"
        adapt_to_file(MODEL, "synthetic:clean:n=128", start, AdaptConfig(batch_size=32))
        spec, shifting = stream_segments(args.frames)
        collapse = collapse_segments(args.frames)
        payload["collapse_evidence"] = {}
        for segment in collapse[1:3]:
            print(f"collapse segment evidence, {segment[0]}:", flush=True)
            evidence = payload["collapse_evidence"][segment[0]] = collapse_evidence(segment)
            for k, v in evidence.items():
                print(f"  {k}: accuracy {100 * v['accuracy']:.1f} %, top class {v['top_class']} share "
                      f"{100 * v['top_share']:.1f} %, mean entropy {v['mean_entropy']:.3f} nats", flush=True)
        npz = write_npz(collapse, folder / "collapse.npz")
        for key, source, segments in (("shifting", spec, shifting), ("collapse", str(npz), collapse)):
            bounds = [(name, k * args.frames, (k + 1) * args.frames) for k, (name, _, _) in enumerate(segments)]
            print(f"{key}: baselines", flush=True)
            base = baselines(segments)
            print(f"{key}: loop at {args.fps:g} frames/s (load {load_average()})", flush=True)
            load = load_average()
            run = loop_run(folder / f"state-{key}", source, start, bounds, **loop_kw)
            described = (source if key == "shifting" else
                         f"npz: clean, x{EXPOSURE:g} exposure, {STRIPES:g} stripes, clean")
            payload["streams"][key] = {"source": described, "baselines": base, "loop": run, "load_before_loop": load}
        if "lr" not in args.skip:
            print("shifting, lr x 1000:", flush=True)
            bounds = [(n, k * args.frames, (k + 1) * args.frames) for k, (n, _, _) in enumerate(shifting)]
            payload["lr1000"] = loop_run(folder / "state-lr", spec, start, bounds, lr=1.0, **loop_kw)
        if "hog" not in args.skip:
            n = os.cpu_count() or 1
            print(f"shifting, {n} busy-loop processes:", flush=True)
            bounds = [(name, k * args.frames, (k + 1) * args.frames) for k, (name, _, _) in enumerate(shifting)]
            with cpu_hog(n, timeout=30 + 3 * 6 * args.frames / args.fps):
                time.sleep(2)
                load = load_average()
                run = loop_run(folder / "state-hog", spec, start, bounds, **loop_kw)
                payload["hog"] = {"processes": n, "load_at_start": load, "load_at_end": load_average(), "loop": run}
    payload["load_after"] = load_average()
    publish(args.out, payload, markdown(payload))


def markdown(p: dict[str, Any]) -> list[str]:
    lines = ["# Device loop per segment: loop vs unadapted vs once-adapted (issue 11)", "",
             f"Command: `OMP_NUM_THREADS=1 {p['command']}`", "",
             f"Loop: `builtin:small_resnet` started from a checkpoint GpreBN-adapted on 128 clean images, served "
             f"one frame at a time (onnxruntime CPU, 1 thread), paced at {p['fps']:g} frames/s, a round every "
             f"{p['every']} frames or when the shift detector fires, buffer {p['buffer']} frames, 1 torch thread, "
             f"{p['frames']} frames per segment, metrics window {p['window']} frames. Accuracy (%) over each "
             "segment's SECOND half. Unadapted: the source model (committed weights). Once-adapted: the source "
             "model GpreBN-adapted once (defaults: batch 64, lr 1e-3) on the segment's first half, in stream order. "
             f"Pass: loop >= once-adapted - {ONCE_TOLERANCE:g} and loop >= unadapted - {UNADAPTED_TOLERANCE:g}.",
             ""]
    lines += ["## The collapse segments", "",
              f"Clean frames, then other clean frames at {EXPOSURE:g}x exposure, then others behind vertical "
              f"stripes ({STRIPES:g} x 0/1 alternating every 2 pixel columns + {1 - STRIPES:g} x the frame), then "
              "clean frames (float frames in [0, 1] in an .npz with labels). On the two shifted segments:", "",
              "| segment | model | frames | accuracy | top class | top-class share | mean entropy (nats) | of log C |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for segment, ev in p["collapse_evidence"].items():
        for key, label, frames in (("unadapted", "unadapted", "all"),
                                   ("unadapted_second_half", "unadapted", "second half"),
                                   ("adabn_second_half", "AdaBN on the first half", "second half")):
            v = ev[key]
            lines.append(f"| {segment} | {label} | {frames} | {100 * v['accuracy']:.1f} | {v['top_class']} | "
                         f"{100 * v['top_share']:.1f} % | {v['mean_entropy']:.3f} | "
                         f"{v['mean_entropy'] / v['max_entropy']:.2f} |")
    verdicts = []
    for key, title in (("shifting", "Built-in shifting stream"), ("collapse", "Collapse stream")):
        s = p["streams"][key]
        rows, table = segment_rows(s["loop"], s["baselines"])
        verdicts += [(key, r) for r in rows]
        lines += ["", f"## {title}", "", f"Source: `{s['source']}`; load average before the loop run "
                  f"{s['load_before_loop']}.", "", *table, "", *round_lines(s["loop"])]
    failed = [f"{k}/{r['segment']}" for k, r in verdicts if not (r["pass_once"] and r["pass_unadapted"])]
    lines += ["", f"Segments failing a criterion: {', '.join(failed) if failed else 'none'}."]
    if "lr1000" in p:
        r = p["lr1000"]
        verdict = ("met" if r["passed"] == 0 else
                   f"**missed**: {r['passed']} candidate(s) passed (rounds "
                   f"{[t['round'] for t in r['timeline'] if t['outcome'] == 'passed']})")
        lines += ["", "## lr x 1000 (lr 1.0) on the built-in stream", "",
                  f"Every candidate must be caught: {verdict}. Swaps {r['swaps']}, of which fallbacks to the start "
                  f"model {r.get('fallbacks', 0)} (the loop serves the start model again when what serves answers "
                  f"far fewer classes than the unadapted model and the start passes the gates there); served "
                  f"accuracy {_f(100 * (r['accuracy'] or 0))} %; second-half accuracy per segment: " +
                  ", ".join(f"{k} {_f(None if v['accuracy'] is None else 100 * v['accuracy'])}"
                            for k, v in r["second_half"].items()) + ".", "", *round_lines(r)]
    lines += ["", "## Serving latency (ms, batch 1) from the loop's own log", "",
              "| run | idle frames | idle p50 | idle p99 | adapting frames | adapting p50 | adapting p99 | "
              "p99 ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|",
              latency_line(f"built-in stream, no hog (load {p['streams']['shifting']['load_before_loop']})",
                           p["streams"]["shifting"]["loop"])]
    if "hog" in p:
        h = p["hog"]
        lines.append(latency_line(f"built-in stream, {h['processes']} busy-loop processes (load "
                                  f"{h['load_at_start']} at its start, {h.get('load_at_end')} at its end)", h["loop"]))
        lines += ["", f"Under the hog: rounds {h['loop']['rounds']}, swaps {h['loop']['swaps']}, online accuracy "
                  f"{_f(100 * (h['loop']['accuracy'] or 0))} %; second-half accuracy per segment: " +
                  ", ".join(f"{k} {_f(None if v['accuracy'] is None else 100 * v['accuracy'])}"
                            for k, v in h["loop"]["second_half"].items()) + "."]
    lines += ["", f"Load average before / after the whole script: {p['load_before']} / {p['load_after']} "
              "(2 cores shared with other workers' jobs)."]
    return lines


if __name__ == "__main__":
    main()
