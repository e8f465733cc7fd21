"""`adapt` and `info`: the adapt stage's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from gprebn_edge.cli._app import (
    app,
    cli_errors,
    console,
    err_console,
    error_line,
    existing,
    key_value_table,
    pct,
    progress,
    say_replaced,
)
from gprebn_edge.errors import ArtifactError, GprebnError
from gprebn_edge.io import strict_json
from gprebn_edge.runtime.loading import health_note, model_metadata
from gprebn_edge.validate import flag_number, require


@app.command()
def adapt(
    model: Annotated[str, typer.Option(help="builtin:NAME, torchvision:NAME, path/to/file.py:factory or "
                                       "package.module:factory.")],
    data: Annotated[str, typer.Option(help="Calibration images: a folder (class subfolders = labels), "
                                      ".npy/.npz, or synthetic:DOMAIN[:SEVERITY].")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Adapted checkpoint (.safetensors).")],
    weights: Annotated[str | None, typer.Option(help="Source weights: safetensors or a torch state dict.")] = None,
    method: Annotated[str, typer.Option(help="gprebn, tent, adabn, bn or source.")] = "gprebn",
    batch_size: Annotated[int, typer.Option(help="Calibration batch size (one step per batch).")] = 64,
    lr: Annotated[float, typer.Option(help="Learning rate at batch 64 (scaled for other batch sizes).")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adam or sgd (momentum 0.9).")] = "adam",
    lr_scaling: Annotated[str, typer.Option(help="sqrt (lr x sqrt(batch/64), Adam betas per image), linear "
                                            "(lr x batch/64) or none.")] = "sqrt",
    momentum: Annotated[str, typer.Option(help="Statistics: 'cumulative' or an EMA rate per 64 images.")]
    = "cumulative",
    theta: Annotated[float, typer.Option(help="Weight of target statistics vs source statistics.")] = 1.0,
    stats_init: Annotated[str, typer.Option(help="Target estimate starts from: first (batch) or source.")]
    = "first",
    stats_order: Annotated[str, typer.Option(help="Update statistics before or after normalizing a batch.")]
    = "before",
    freeze: Annotated[str | None, typer.Option(help="refresh (re-estimate statistics with a final pass) or "
                                               "direct; default: the method's own.")] = None,
    resize: Annotated[int | None, typer.Option(help="Resize the shorter side to N pixels.")] = None,
    crop: Annotated[int | None, typer.Option(help="Center-crop to N x N pixels.")] = None,
    mean: Annotated[str | None, typer.Option(help="Per-channel mean for pixels in [0,1], e.g. 0.485,0.456,0.406.")]
    = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std for pixels in [0,1].")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Passed to the model factory.")] = None,
    shuffle: Annotated[bool, typer.Option(help="Read a folder in a seeded shuffled order (--no-shuffle keeps "
                                          "file order, as a live stream).")] = True,
    limit: Annotated[int | None, typer.Option(help="Use at most N calibration images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for shuffling and adaptation.")] = 0,
    holdout: Annotated[float, typer.Option(help="Fraction of the calibration images held back (never adapted "
                                           "on) to check the adapted model against the unadapted one; 0: "
                                           "no check.")] = 0.1,
    force: Annotated[bool, typer.Option("--force", help="Write the model even when the health check says it "
                                        "collapsed (a non-finite model is never written).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Adapt a BatchNorm model to unlabeled target images and write the adapted checkpoint."""
    with cli_errors():  # imports torch: without it, one line naming the extra
        from gprebn_edge.adapt import AdaptConfig, adapt_to_file
        from gprebn_edge.data.preprocess import parse_triple
        from gprebn_edge.health import advice
        from gprebn_edge.methods import StatsConfig

        flag_number(lr, "--lr", low=0)
        flag_number(batch_size, "--batch-size", low=1)
        flag_number(limit, "--limit", low=1)
        stats = StatsConfig(momentum=_parse_momentum(momentum), theta=theta, init=stats_init, order=stats_order)
        config = AdaptConfig(method=method, batch_size=batch_size, lr=lr, optimizer=optimizer,
                             lr_scaling=lr_scaling, stats=stats, freeze=freeze, holdout=holdout, seed=seed)
        preprocess = {"resize": resize, "crop": crop,
                      "mean": parse_triple(mean, "mean") if mean else None,
                      "std": parse_triple(std, "std") if std else None}
        replaced = existing(output)
        with progress(enabled=not as_json) as update:
            result = adapt_to_file(model, data, output, config, weights=weights, num_classes=num_classes,
                                   preprocess=preprocess, shuffle=shuffle, limit=limit, force=force,
                                   progress=lambda done, total: update(f"adapting ({method})", done, total))
        say_replaced(replaced)
        s = result.summary
        note = health_note(s["health"])
        if note is not None:
            err_console.print(error_line("warning:", advice(s["health"]) if s["health"]["verdict"] != "unchecked"
                                         else note), soft_wrap=True)
        if as_json:
            typer.echo(strict_json({"output": str(output), **s}, indent=2))
            return
        table = key_value_table(f"adapted {model} with {method} -> {output}")
        table.add_row("calibration images", f"{s['images']} ({s['skipped']} unreadable, skipped)")
        table.add_row("steps", str(s["steps"]))
        table.add_row("online error", pct(s["online_error"]))
        before, after = s["calibration_before"], s["calibration_after"]
        table.add_row("mean entropy before -> after", f"{before['entropy']:.3f} -> {after['entropy']:.3f}")
        if before["error"] is not None:
            table.add_row("calibration error before -> after", f"{pct(before['error'])} -> {pct(after['error'])}")
        _health_rows(table, s["health"])
        table.add_row("time", f"{s['seconds']:.1f} s")
        console.print(table)


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


def _parse_momentum(text: str) -> float | None:
    if text == "cumulative":
        return None
    try:
        return float(text)
    except ValueError:
        raise GprebnError(f"--momentum must be 'cumulative' or a number in (0, 1], got {text!r}") from None


@app.command()
def info(
    artifact: Annotated[Path, typer.Argument(help="An adapted checkpoint (.safetensors), or an exported ONNX "
                                             "file or engine (its metadata; no PyTorch needed).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole metadata as JSON.")] = False,
) -> None:
    """Show what an artifact holds: model, preprocessing, method, calibration data, what changed."""
    with cli_errors():
        if artifact.suffix.lower() in _EXPORT_SUFFIXES:
            _export_info(artifact, as_json)
            return
        from gprebn_edge.checkpoint import load_checkpoint  # imports torch

        state, meta = load_checkpoint(artifact)
        if as_json:
            meta = {k: v for k, v in meta.items() if k != "source_bn"}
            typer.echo(strict_json(meta, indent=2))
            return
        table = _info_table(artifact, state, meta)
        console.print(table)


_EXPORT_SUFFIXES = (".onnx", ".engine", ".plan", ".trt")


def _export_info(path: Path, as_json: bool) -> None:
    """An export's own metadata (ONNX metadata, or an engine's manifest), read without torch."""
    try:
        meta = model_metadata(path)
    except ArtifactError as e:
        raise ArtifactError(f"{e} (info expected an adapted checkpoint from `gprebn-edge adapt` or its "
                            "export)") from None
    if as_json:
        typer.echo(strict_json({k: v for k, v in meta.items() if k != "raw"} | {"metadata": meta["raw"]},
                               indent=2))
        return
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
    console.print(table)


def _info_table(path: Path, state: dict, meta: dict[str, Any]) -> Table:
    """load_checkpoint checked the types of the fields present; `need` says which one is missing."""
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
