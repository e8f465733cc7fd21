"""`adapt` and `info`: the adapt stage's commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gprebn_edge.cli._app import command, console, err_console, error_line
from gprebn_edge.cli.options import JsonOut, Limit
from gprebn_edge.cli.output import check_outputs, emit_json, existing, json_to_stdout, say_replaced
from gprebn_edge.cli.tables import adapt_table, checkpoint_table, export_info_table
from gprebn_edge.errors import ArtifactError, GprebnError
from gprebn_edge.io import strict_json
from gprebn_edge.runtime.loading import health_note, model_metadata
from gprebn_edge.validate import flag_number

if TYPE_CHECKING:
    from gprebn_edge.adaptation import AdaptConfig


@command()
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
    limit: Limit = None,
    seed: Annotated[int, typer.Option(help="Seed for shuffling and adaptation.")] = 0,
    holdout: Annotated[float, typer.Option(help="Fraction of the calibration images held back (never adapted "
                                           "on) to check the adapted model against the unadapted one; 0: "
                                           "no check.")] = 0.1,
    force: Annotated[bool, typer.Option("--force", help="Write the model even when the health check says it "
                                        "collapsed (a non-finite model is never written).")] = False,
    max_memory: Annotated[str | None, typer.Option(help="Peak memory the run may use, e.g. 2GB, 1.5GiB, 800MB: "
                                                   "picks the micro-batch (and checkpointing of blocks) to "
                                                   "stay under it; see docs/budget.md.")] = None,
    json_out: JsonOut = None,
) -> None:
    """Adapt a BatchNorm model to unlabeled target images and write the adapted checkpoint. Progress lines
    (images, rate, ETA) go to stderr every few seconds, also into a redirected log."""
    from gprebn_edge.adaptation import adapt_to_file  # imports torch: without it, one line naming the extra
    from gprebn_edge.budget import parse_size
    from gprebn_edge.data.preprocess import parse_triple
    from gprebn_edge.progress import progress_lines

    config = _adapt_config(method=method, batch_size=batch_size, lr=lr, optimizer=optimizer, lr_scaling=lr_scaling,
                           momentum=momentum, theta=theta, stats_init=stats_init, stats_order=stats_order,
                           freeze=freeze, holdout=holdout, seed=seed, limit=limit)
    config.max_memory = parse_size(max_memory) if max_memory is not None else None
    preprocess = {"resize": resize, "crop": crop, "mean": parse_triple(mean, "mean") if mean else None,
                  "std": parse_triple(std, "std") if std else None}
    check_outputs(json_out)
    replaced = existing(output, json_out)
    result = adapt_to_file(model, data, output, config, weights=weights, num_classes=num_classes,
                           preprocess=preprocess, shuffle=shuffle, limit=limit, force=force,
                           progress=progress_lines())
    say_replaced(replaced)
    _warn_health(result.summary["health"])
    if not json_to_stdout(json_out):
        console.print(adapt_table(model, method, output, result.summary))
    emit_json(json_out, strict_json({"output": str(output), **result.summary}, indent=2))


def _adapt_config(*, method: str, batch_size: int, lr: float, optimizer: str, lr_scaling: str, momentum: str,
                  theta: float, stats_init: str, stats_order: str, freeze: str | None, holdout: float,
                  seed: int, limit: int | None) -> AdaptConfig:
    """adapt's flags as an AdaptConfig, the numbers checked first."""
    from gprebn_edge.adaptation import AdaptConfig
    from gprebn_edge.methods import StatsConfig

    flag_number(lr, "--lr", low=0)
    flag_number(limit, "--limit", low=1)
    stats = StatsConfig(momentum=_parse_momentum(momentum), theta=theta, init=stats_init, order=stats_order)
    return AdaptConfig(method=method, batch_size=batch_size, lr=lr, optimizer=optimizer, lr_scaling=lr_scaling,
                       stats=stats, freeze=freeze, holdout=holdout, seed=seed)


def _warn_health(health: dict[str, Any]) -> None:
    """One warning line on stderr when the health check did not come out clean."""
    from gprebn_edge.health import advice

    note = health_note(health)
    if note is not None:
        err_console.print(error_line("warning:", advice(health) if health["verdict"] != "unchecked" else note),
                          soft_wrap=True)


def _parse_momentum(text: str) -> float | None:
    if text == "cumulative":
        return None
    try:
        return float(text)
    except ValueError:
        raise GprebnError(f"--momentum must be 'cumulative' or a number in (0, 1], got {text!r}") from None


@command()
def info(
    artifact: Annotated[Path, typer.Argument(help="An adapted checkpoint (.safetensors), or an exported ONNX "
                                             "file or engine (its metadata; no PyTorch needed).")],
    json_out: JsonOut = None,
) -> None:
    """Show what an artifact holds: model, preprocessing, method, calibration data, what changed."""
    check_outputs(json_out)
    if artifact.suffix.lower() in _EXPORT_SUFFIXES:
        meta = _export_metadata(artifact)
        payload = {k: v for k, v in meta.items() if k != "raw"} | {"metadata": meta["raw"]}
        if not json_to_stdout(json_out):
            console.print(export_info_table(artifact, meta))
    else:
        from gprebn_edge.checkpoint import load_checkpoint  # imports torch

        state, meta = load_checkpoint(artifact)
        payload = {k: v for k, v in meta.items() if k != "source_bn"}
        if not json_to_stdout(json_out):  # the table needs every field; the JSON shows what there is
            console.print(checkpoint_table(artifact, state, meta))
    emit_json(json_out, strict_json(payload, indent=2))


_EXPORT_SUFFIXES = (".onnx", ".engine", ".plan", ".trt")


def _export_metadata(path: Path) -> dict[str, Any]:
    """An export's own metadata (ONNX metadata, or an engine's manifest), read without torch."""
    try:
        return model_metadata(path)
    except ArtifactError as e:
        raise ArtifactError(f"{e} (info expected an adapted checkpoint from `gprebn-edge adapt` or its "
                            "export)") from None
