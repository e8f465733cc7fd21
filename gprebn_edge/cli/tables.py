"""The tables commands print, built from a library result: commands only call one of these and print it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from gprebn_edge.runtime.loading import health_note
from gprebn_edge.validate import require

__all__ = ["key_value_table", "pct", "adapt_table", "checkpoint_table", "export_info_table", "export_table",
           "demo_table", "demo_lines"]


def key_value_table(title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")  # paths and hashes wrap whole, never cut with an ellipsis
    return table


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def adapt_table(model: str, method: str, output: Path, s: dict[str, Any]) -> Table:
    """adapt's summary `s`: images, steps, errors, entropy before -> after, the health check, time."""
    table = key_value_table(f"adapted {model} with {method} -> {output}")
    table.add_row("calibration images", f"{s['images']} ({s['skipped']} unreadable, skipped)")
    table.add_row("steps", str(s["steps"]))
    table.add_row("online error", pct(s["online_error"]))
    before, after = s.get("calibration_before"), s.get("calibration_after")
    if before and after and before.get("entropy") is not None and after.get("entropy") is not None:
        where = " (held back)" if before.get("on") == "held-back" else ""
        table.add_row(f"mean entropy before -> after{where}", f"{before['entropy']:.3f} -> {after['entropy']:.3f}")
        if before.get("error") is not None and after.get("error") is not None:
            table.add_row(f"error before -> after{where}", f"{pct(before['error'])} -> {pct(after['error'])}")
    _health_rows(table, s["health"])
    if s.get("memory_plan"):
        p = s["memory_plan"]
        table.add_row("memory plan", f"budget {p['budget_text']}: micro-batch {p['micro_batch']} of {p['batch_size']}"
                      f"{', blocks checkpointed' if p['checkpoint'] else ''}, estimated peak "
                      f"{p['estimated_peak_text']}")
    table.add_row("time", f"{s['seconds']:.1f} s")
    return table


def _health_rows(table: Table, health: dict[str, Any]) -> None:
    """The health check's rows: held-back images, before -> after, and the verdict."""
    if health.get("verdict") == "unchecked":
        table.add_row("health check", f"unchecked: {health.get('reason', '')}")
        return
    b, a = health["before"], health["after"]
    table.add_row("held-back images", f"{health['images']} (not adapted on)")
    if a.get("finite"):
        table.add_row("  entropy (nats)", f"{b['entropy']:.3f} -> {a['entropy']:.3f}")
        table.add_row("  confidence", f"{b['confidence']:.3f} -> {a['confidence']:.3f}")
        table.add_row("  classes predicted", f"{b['classes_predicted']} -> {a['classes_predicted']} (histogram "
                      f"entropy {b['histogram_entropy']:.2f} -> {a['histogram_entropy']:.2f})")
        table.add_row("  agreement with unadapted", pct(health["agreement"]))
    table.add_row("health verdict", health["verdict"] + "".join(f"\n  {sig}" for sig in health["signals"]))


def checkpoint_table(path: Path, state: dict, meta: dict[str, Any]) -> Table:
    """An adapted checkpoint's metadata. load_checkpoint checked the types of the fields present; `need`
    says which one is missing."""
    def need(name: str, kind: type | tuple[type, ...] = object) -> Any:
        return require(meta, name, kind, path)

    table = key_value_table(str(path))
    m, p, method, cal, s = (need("model", dict), need("preprocess", dict), need("method", dict),
                            need("calibration", dict), need("summary", dict))
    table.add_row("model", f"{need('model.spec')} ({need('num_classes')} classes)")
    table.add_row("source weights", f"{m.get('weights') or '-'} {m.get('weights_sha256') or ''}")
    table.add_row("tensors", f"{len(state)} ({sum(t.numel() for t in state.values()):,} values)")
    table.add_row("preprocess", f"resize {p.get('resize')}, crop {p.get('crop')}, mean {need('preprocess.mean')}, "
                  f"std {need('preprocess.std')}")
    table.add_row("method", ", ".join(f"{k}={v}" for k, v in method.items()))
    table.add_row("calibration", f"{need('calibration.spec')}: {need('summary.images')} images, "
                  f"{cal.get('skipped', 0)} skipped, {str(cal.get('fingerprint', '-'))[:23]}...")
    table.add_row("online error", pct(s.get("online_error")))
    before, after = s.get("calibration_before"), s.get("calibration_after")
    entropy = [f"{d['entropy']:.3f}" if isinstance(d, dict) and "entropy" in d else "-" for d in (before, after)]
    table.add_row("entropy before -> after", " -> ".join(entropy))
    shift = sorted(meta.get("statistics_shift") or [], key=lambda r: -r["mean_shift"])[:3]
    health = s.get("health")
    table.add_row("adaptation health",
                  (health_note(health) or "ok") if health else "not recorded (made before the check)")
    table.add_row("largest statistics shift", "; ".join(
        f"{r['layer']}: mean {r['mean_shift']:.2f} sd, std x{r['std_ratio']:.2f}" for r in shift))
    table.add_row("created", f"{meta.get('created', '-')} by gprebn-edge {meta.get('gprebn_edge_version', '-')}")
    return table


def export_info_table(path: Path, meta: dict[str, Any]) -> Table:
    """An export's own metadata (model_metadata of an ONNX file or an engine's manifest)."""
    table = key_value_table(str(path))
    p = meta["preprocess"] or {}
    table.add_row("format", meta["format"])
    table.add_row("model", f"{meta['model'] or '-'} ({meta['num_classes'] or '?'} classes)")
    table.add_row("preprocess", f"resize {p.get('resize')}, crop {p.get('crop')}, mean {p.get('mean')}, "
                  f"std {p.get('std')}")
    health = meta["health"]
    table.add_row("adaptation health", (health_note(health) or "ok") if health else "not recorded")
    for key in ("artifact", "gprebn_edge"):
        if meta["raw"].get(key) is not None:
            table.add_row("exported from" if key == "artifact" else "by gprebn-edge", str(meta["raw"][key]))
    return table


def export_table(artifact: Path, manifest: dict[str, Any]) -> Table:
    """An export's manifest: the ONNX file, the fold, parity against PyTorch, warnings and the engine."""
    p, fold = manifest["parity"], manifest["fold"]
    table = key_value_table(f"exported {manifest['model']} model of {artifact}")
    table.add_row("onnx", f"{manifest['onnx']} ({manifest.get('precision', 'fp32')})")
    table.add_row("BatchNorm folded / kept", f"{len(fold['folded'])} / {len(fold['skipped'])} (in {fold['where']})")
    for bn in fold["skipped"]:
        table.add_row("kept", f"{bn['bn']}: {bn['reason']}")
    table.add_row("parity vs PyTorch", f"{p['images']} images: max abs {p['max_abs']:.2e}, max rel "
                  f"{p['max_rel']:.2e} (limit {p['limit']:.0e}), top-1 agreement {100 * p['top1_agreement']:.2f} %")
    if manifest.get("kept_float"):
        table.add_row("kept in float", ", ".join(f"{op} x{n}" for op, n in manifest["kept_float"].items()))
    for w in manifest["warnings"]:
        table.add_row("warning", w)
    note = health_note(manifest.get("adaptation_health"))
    if note is not None:
        table.add_row("warning", note)
    if manifest["tensorrt"]:
        t = manifest["tensorrt"]
        table.add_row("engine", f"{t['engine']} ({t.get('precision')}, TensorRT {t.get('tensorrt')}, {t.get('gpu')})")
    table.add_row("time", f"{manifest['seconds']:.1f} s")
    return table


def demo_table(report: dict[str, Any]) -> Table:
    """The demo's error of the unadapted and adapted ONNX per shift."""
    table = Table(title="error of the unadapted and adapted ONNX on held-out images (onnxruntime)")
    for col in ("shift", "unadapted", "adapted", "agree", "latency", "parity", "health"):
        table.add_column(col, justify="left" if col == "shift" else "right", no_wrap=True)
    for r in report["rows"]:
        table.add_row(r["domain"], pct(r["source_error"]), pct(r["adapted_error"]), f"{100 * r['agreement']:.0f} %",
                      f"{r['latency_ratio']:.3f}", f"{r['parity_max_rel']:.0e}", r["health"])
    table.caption = ("agree: same top-1 class; latency: adapted / unadapted, interleaved; parity: max relative "
                     "logit error of ONNX vs PyTorch (top-1 agreement 100 % on every export); health: adapt's "
                     "check on held-back calibration images")
    return table


def demo_lines(report: dict[str, Any]) -> list[str]:
    """The demo's lines after its table: bench per batch, TensorRT, where the report and plots are."""
    lines = [f"bench batch {b['batch']:>2}: p50 unadapted {b['unadapted_p50_ms']:.3f} ms, adapted "
             f"{b['adapted_p50_ms']:.3f} ms, ratio {b['ratio_p50']:.3f}" for b in report["bench"]["rows"]]
    t = report["tensorrt"]
    lines.append(f"TensorRT: {t['status']}" + (f" ({t['reason']})" if t.get("reason") else ""))
    lines.append(f"report: {report['report']}  plots: {', '.join(report['plots'][:2])} (+ one per shift)  "
                 f"({report['seconds']:.1f} s)")
    return lines
