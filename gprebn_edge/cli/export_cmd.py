"""`export`: fold, ONNX (fp32, fp16 or int8 Q/DQ), TensorRT."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gprebn_edge.cli._app import command, console, err_console, error_line, status
from gprebn_edge.cli.options import JsonOut, TrustModelCode
from gprebn_edge.cli.output import check_outputs, emit_json, existing, json_to_stdout, say_replaced
from gprebn_edge.cli.tables import export_table
from gprebn_edge.errors import GprebnError
from gprebn_edge.io import strict_json
from gprebn_edge.runtime.loading import health_note
from gprebn_edge.validate import flag_number

if TYPE_CHECKING:
    from gprebn_edge.export.pipeline import EngineOptions


@command()
def export(
    artifact: Annotated[Path, typer.Argument(help="An adapted checkpoint (.safetensors).")],
    onnx: Annotated[Path | None, typer.Option(help="ONNX output (default: next to the artifact).")] = None,
    unadapted: Annotated[bool, typer.Option(help="Export the source model through the same path.")] = False,
    data: Annotated[str | None, typer.Option(help="Images to check ONNX against PyTorch on (default: the "
                                             "artifact's calibration data); --int8 calibrates on them too "
                                             "(the site's images, at least 64).")] = None,
    check_images: Annotated[int, typer.Option(help="How many images the parity check uses.")] = 1000,
    fp16: Annotated[bool, typer.Option("--fp16", help="A float16 ONNX (float32 inputs and outputs), checked "
                                       "against PyTorch fp32.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="An int8 Q/DQ ONNX calibrated on --data, checked against "
                                       "PyTorch fp32.")] = False,
    trt: Annotated[bool, typer.Option("--trt", help="Also build a TensorRT engine from the ONNX, strongly typed "
                                      "(needs the trt extra and a GPU: build it on the device that will run "
                                      "it).")] = False,
    engine: Annotated[Path | None, typer.Option(help="Engine output (default: the ONNX path with .engine).")] = None,
    refittable: Annotated[bool, typer.Option("--refittable", help="Engine with the REFIT flag (for the device "
                                             "loop, which refits new weights by name).")] = False,
    batch: Annotated[str, typer.Option(help="Engine batch profile MIN:OPT:MAX (or N).")] = "1:1:32",
    workspace_mb: Annotated[int, typer.Option(help="TensorRT workspace memory limit in MiB.")] = 1024,
    json_out: JsonOut = None,
    model: Annotated[str | None, typer.Option(help="The model code the artifact names (file.py:factory or "
                                              "module:factory), given to consent to importing exactly that "
                                              "code; builtin: and torchvision: models need none.")] = None,
    trust_model_code: TrustModelCode = False,
) -> None:
    """Fold BatchNorm into the convs and export ONNX (fp32, or --fp16 / --int8), checked against PyTorch fp32
    with onnxruntime; with --trt, also build a TensorRT engine from it."""
    from gprebn_edge.consent import CodeConsent  # imports torch: without it, one line naming the extra
    from gprebn_edge.export.pipeline import default_engine_path, default_onnx_path, export_artifact
    from gprebn_edge.runtime.loading import manifest_beside

    if check_images < 1:
        raise GprebnError(f"--check-images must be at least 1, got {check_images}")
    if fp16 and int8:
        raise GprebnError("choose one of --fp16 and --int8")
    precision = "fp16" if fp16 else "int8" if int8 else "fp32"
    options = _engine_options(trt=trt, engine=engine, refittable=refittable, batch=batch, workspace_mb=workspace_mb)
    check_outputs(json_out)
    out = onnx or default_onnx_path(artifact, unadapted, precision)
    replaced = existing(out, manifest_beside(out), (engine or default_engine_path(out)) if trt else None, json_out)
    with status() as say:
        manifest = export_artifact(artifact, onnx, unadapted=unadapted, data=data, check_images=check_images,
                                   engine=options, progress=say, precision=precision,
                                   consent=CodeConsent(spec=model, any_code=trust_model_code, flag="--model"))
    say_replaced(replaced)
    if not json_to_stdout(json_out):
        note = health_note(manifest.get("adaptation_health"))
        table = export_table(artifact, manifest)
        if note is not None:
            err_console.print(error_line("warning:", f"{note} (recorded by adapt; see `gprebn-edge info`)"),
                              soft_wrap=True)
        console.print(table)
    emit_json(json_out, strict_json(manifest, indent=2))


def _engine_options(*, trt: bool, engine: Path | None, refittable: bool, batch: str,
                    workspace_mb: int) -> EngineOptions | None:
    """The engine flags as EngineOptions (None without --trt), checked to make sense together."""
    from gprebn_edge.export.pipeline import EngineOptions
    from gprebn_edge.export.tensorrt_build import parse_batch_range

    engine_flags = [name for name, on in (("--engine", engine is not None),
                                          ("--refittable", refittable), ("--batch", batch != "1:1:32"),
                                          ("--workspace-mb", workspace_mb != 1024)) if on]
    if engine_flags and not trt:
        raise GprebnError(f"{', '.join(engine_flags)} only apply to engines: add --trt")
    flag_number(workspace_mb, "--workspace-mb", low=1)
    if not trt:
        return None
    return EngineOptions(engine=engine, batch=parse_batch_range(batch), refittable=refittable,
                         workspace_mb=workspace_mb)
