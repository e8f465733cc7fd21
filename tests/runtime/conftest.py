"""Shared runtime fixtures: one small adapted checkpoint of the built-in model, its folded ONNX export and
real images, made once per session (about 3 s on two cores)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import collect, open_source
from gprebn_edge.export.pipeline import export_artifact

DATA = "synthetic:fog:5:n=64"


@dataclass(frozen=True)
class Exported:
    checkpoint: Path   # adapted .safetensors
    onnx: Path         # its folded export
    images: np.ndarray  # 32 real preprocessed images, float32 NCHW


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Exported:
    folder = tmp_path_factory.mktemp("runtime")
    checkpoint = folder / "adapted.safetensors"
    adapt_to_file("builtin:small_resnet", DATA, checkpoint, AdaptConfig(batch_size=32))
    manifest = export_artifact(checkpoint, folder / "adapted.onnx", check_images=64)
    images, _ = collect(open_source(DATA, Preprocess.from_dict(manifest["preprocess"]), limit=32))
    return Exported(checkpoint, Path(manifest["onnx"]), np.ascontiguousarray(images, dtype=np.float32))


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """(unadapted ONNX, adapted ONNX, preprocessing) from one small adaptation on target data."""
    folder = tmp_path_factory.mktemp("compare")
    artifact = folder / "adapted.safetensors"
    adapt_to_file("builtin:small_resnet", "synthetic:gaussian_noise:5:n=256", artifact, AdaptConfig())
    adapted = export_artifact(artifact, folder / "adapted.onnx", check_images=64)
    source = export_artifact(artifact, folder / "source.onnx", unadapted=True, check_images=64)
    return source["onnx"], adapted["onnx"], Preprocess.from_dict(adapted["preprocess"])
