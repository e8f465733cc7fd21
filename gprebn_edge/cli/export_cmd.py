"""`export`: fold, ONNX, TensorRT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gprebn_edge.cli._app import (
    TRUST_HELP,
    app,
    cli_errors,
    console,
    err_console,
    error_line,
    existing,
    key_value_table,
    say_replaced,
    status,
)
from gprebn_edge.errors import GprebnError
from gprebn_edge.io import strict_json
from gprebn_edge.runtime.loading import health_note
from gprebn_edge.validate import flag_number


@app.command()
def export(
    artifact: Annotated[Path, typer.Argument(help="An adapted checkpoint (.safetensors).")],
    onnx: Annotated[Path | None, typer.Option(help="ONNX output (default: next to the artifact).")] = None,
    unadapted: Annotated[bool, typer.Option(help="Export the source model through the same path.")] = False,
    data: Annotated[str | None, typer.Option(help="Images to check ONNX against PyTorch on (default: the "
                                             "artifact's calibration data).")] = None,
    check_images: Annotated[int, typer.Option(help="How many images the parity check uses.")] = 1000,
    trt: Annotated[bool, typer.Option("--trt", help="Also build a TensorRT engine (needs TensorRT 10 and a GPU: "
                                      "build it on the device that will run it).")] = False,
    engine: Annotated[Path | None, typer.Option(help="Engine output (default: the ONNX path with .engine).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Engine in fp16.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Engine in int8, calibrated on the check images.")] = False,
    refittable: Annotated[bool, typer.Option("--refittable", help="Engine with the REFIT flag (for the device "
                                             "loop, which refits new weights by name).")] = False,
    batch: Annotated[str, typer.Option(help="Engine batch profile MIN:OPT:MAX (or N).")] = "1:1:32",
    workspace_mb: Annotated[int, typer.Option(help="TensorRT workspace memory limit in MiB.")] = 1024,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    model: Annotated[str | None, typer.Option(help="The model code the artifact names (file.py:factory or "
                                              "module:factory), given to consent to importing exactly that "
                                              "code; builtin: and torchvision: models need none.")] = None,
    trust_model_code: Annotated[bool, typer.Option("--trust-model-code", help=TRUST_HELP)] = False,
) -> None:
    """Fold BatchNorm into the convs and export ONNX, checked against PyTorch with onnxruntime; with --trt,
    also build a TensorRT engine from it."""
    with cli_errors():  # imports torch: without it, one line naming the extra
        from gprebn_edge.consent import CodeConsent
        from gprebn_edge.export.pipeline import (
            EngineOptions,
            default_engine_path,
            default_onnx_path,
            export_artifact,
            manifest_path,
        )
        from gprebn_edge.export.tensorrt_build import parse_batch_range

        if check_images < 1:
            raise GprebnError(f"--check-images must be at least 1, got {check_images}")
        engine_flags = [name for name, on in (("--engine", engine is not None), ("--fp16", fp16), ("--int8", int8),
                                              ("--refittable", refittable), ("--batch", batch != "1:1:32"),
                                              ("--workspace-mb", workspace_mb != 1024)) if on]
        if engine_flags and not trt:
            raise GprebnError(f"{', '.join(engine_flags)} only apply to engines: add --trt")
        flag_number(workspace_mb, "--workspace-mb", low=1)
        if fp16 and int8:
            raise GprebnError("choose one of --fp16 and --int8 (int8 layers that cannot run in int8 run in fp32)")
        options = None
        if trt:
            options = EngineOptions(engine=engine, precision="fp16" if fp16 else "int8" if int8 else "fp32",
                                    batch=parse_batch_range(batch), refittable=refittable, workspace_mb=workspace_mb)
        out = onnx or default_onnx_path(artifact, unadapted)
        replaced = existing(out, manifest_path(out), (engine or default_engine_path(out)) if trt else None)
        with status() as say:
            manifest = export_artifact(artifact, onnx, unadapted=unadapted, data=data, check_images=check_images,
                                       engine=options, progress=say,
                                       consent=CodeConsent(spec=model, any_code=trust_model_code, flag="--model"))
        say_replaced(replaced)
        if as_json:
            typer.echo(strict_json(manifest, indent=2))
            return
        p, fold = manifest["parity"], manifest["fold"]
        table = key_value_table(f"exported {manifest['model']} model of {artifact}")
        table.add_row("onnx", manifest["onnx"])
        table.add_row("BatchNorm folded / kept", f"{len(fold['folded'])} / {len(fold['skipped'])} (in {fold['where']})")
        for bn in fold["skipped"]:
            table.add_row("kept", f"{bn['bn']}: {bn['reason']}")
        table.add_row("parity vs PyTorch", f"{p['images']} images: max abs {p['max_abs']:.2e}, max rel "
                      f"{p['max_rel']:.2e} (limit {p['limit']:.0e}), top-1 agreement {100 * p['top1_agreement']:.2f} %")
        for w in manifest["warnings"]:
            table.add_row("warning", w)
        note = health_note(manifest.get("adaptation_health"))
        if note is not None:
            table.add_row("warning", note)
            err_console.print(error_line("warning:", f"{note} (recorded by adapt; see `gprebn-edge info`)"),
                              soft_wrap=True)
        if manifest["tensorrt"]:
            t = manifest["tensorrt"]
            table.add_row("engine", f"{t['engine']} ({t.get('precision')}, TensorRT {t.get('tensorrt')}, "
                          f"{t.get('gpu')})")
        table.add_row("time", f"{manifest['seconds']:.1f} s")
        console.print(table)
