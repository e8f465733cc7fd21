"""Starting the device loop: check its inputs, then make the state folder and round 0 (a failed check leaves
nothing behind)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from gprebn_edge.budget import release_memory
from gprebn_edge.consent import CodeConsent, require_consent
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.device.config import APP_SOURCE, RUNNER_BATCH, LoopConfig
from gprebn_edge.device.frames import open_frames
from gprebn_edge.device.state import LoopState, StateDir
from gprebn_edge.errors import ArtifactError, InputError
from gprebn_edge.io import atomic_path
from gprebn_edge.runtime.loading import manifest_beside, model_metadata, open_runner, verify_file

__all__ = ["initial_state", "check_inputs", "require_finite", "require_checkpoint_consent", "copy_atomic"]


def copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def initial_state(c: LoopConfig, state_dir: StateDir) -> LoopState:
    """Check the inputs, then make the state folder and round 0's files in it (not yet state.json)."""
    if c.model is None and c.onnx is None and c.engine is None:
        raise InputError("give --model (to adapt) and/or --onnx/--engine (what serves)")
    check_inputs(c)
    state_dir.create()
    checkpoint = ""
    if c.model is not None:
        checkpoint = state_dir.round_path(0, ".safetensors").name
        copy_atomic(Path(c.model), state_dir.path / checkpoint)
    onnx = state_dir.round_path(0, ".onnx")
    if c.onnx is not None:
        copy_atomic(Path(c.onnx), onnx)
    elif c.engine is None:
        from gprebn_edge.export.pipeline import export_artifact  # torch: only to export the first model

        # at the rounds' onnxruntime batch: at 32 this export was the loop's peak under a 1.7GB budget
        export_artifact(state_dir.path / checkpoint, onnx, check_images=256, consent=c.consent,
                        check_batch=RUNNER_BATCH)
        release_memory()  # what the export's passes freed, before serving and rounds size the process
    engine = None
    if c.engine is not None:  # with its manifest: the engine's preprocessing and classes are recorded there
        engine = state_dir.round_path(0, ".engine").name
        copy_atomic(Path(c.engine), state_dir.path / engine)
        if manifest_beside(c.engine).is_file():
            copy_atomic(manifest_beside(c.engine), manifest_beside(state_dir.path / engine))
    return LoopState(round=0, checkpoint=checkpoint, onnx=onnx.name if onnx.exists() else "",
                     engine=engine, source=c.source, rounds_tried=0)

def check_inputs(c: LoopConfig) -> None:
    """Refuse a bad --model/--onnx/--engine before anything is copied into the state folder."""
    served = c.onnx or c.engine
    if c.engine is not None and c.verify:
        verify_file(c.engine)
    served_meta = model_metadata(served) if served is not None else None
    if served_meta is not None and not served_meta.get("preprocess"):
        raise InputError(f"{served} does not record its preprocessing: serve an ONNX file exported by gprebn-edge "
                         "(or keep the engine's manifest, NAME.manifest.json, beside it)")
    if c.model is not None:
        from gprebn_edge.checkpoint import load_checkpoint  # torch: adapting needs it anyway

        _, meta = load_checkpoint(c.model)
        require_checkpoint_consent(c.model, meta, c.consent)
        if served is None and meta.get("preprocess") and c.source != APP_SOURCE:  # a bad --source fails first
            open_frames(c.source, Preprocess.from_dict(meta["preprocess"]), None)
        classes = meta.get("num_classes")
        if served_meta is not None and served_meta.get("num_classes") not in (None, classes):
            raise InputError(f"{served} has {served_meta['num_classes']} classes but --model {c.model} has "
                             f"{classes}: serve an export of that checkpoint")
    if c.onnx is not None:
        # a file onnxruntime cannot load, or that differs from its manifest, fails here
        with open_runner(c.onnx, "onnxruntime", verify=c.verify) as probe:
            if len(probe.inputs()) != 1:
                raise InputError(f"{c.onnx} expects {len(probe.inputs())} inputs; the loop serves models with one "
                                 "image input")
            if served_meta and served_meta.get("preprocess") and c.source != APP_SOURCE:  # sizes must fit
                frames = open_frames(c.source, Preprocess.from_dict(served_meta["preprocess"]), probe.inputs()[0].shape)
                for frame in frames.frames():
                    require_finite(probe.infer(frame.images), c.onnx)
                    break


def require_finite(logits: np.ndarray, model: Path) -> None:
    """Refuse to start serving a model whose outputs on the first frame are NaN or infinite."""
    if not np.isfinite(logits).all():
        raise InputError(f"{model} gives non-finite outputs (NaN/Inf) on the first frame: the loop does not serve "
                         "it; serve an export checked by `gprebn-edge export`, or adapt again")


def require_checkpoint_consent(checkpoint: Path, meta: dict[str, Any], consent: CodeConsent | None) -> None:
    """Refuse, before anything is written or served, a checkpoint naming model code without consent."""
    model = meta.get("model")
    spec = model.get("spec") if isinstance(model, dict) else None
    if not isinstance(spec, str):
        raise ArtifactError(f"{checkpoint}: its metadata field 'model.spec' is missing or not a string: re-create "
                            "it with gprebn-edge adapt")
    require_consent(spec, consent, str(checkpoint))
