"""The adapted checkpoint format and atomic writes."""

import json

import pytest
import torch
from safetensors.torch import save_file

from gprebn_edge.checkpoint import (
    decode_tensors,
    encode_tensors,
    load_checkpoint,
    rebuild_model,
    save_checkpoint,
    source_state_dict,
)
from gprebn_edge.errors import ArtifactError, GprebnError
from gprebn_edge.io import atomic_path, write_text_atomic
from gprebn_edge.models.spec import load_model


def test_encode_decode_round_trip_is_exact():
    tensors = {"a": torch.randn(5, dtype=torch.float32), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "c": torch.randn(3, dtype=torch.float64)}
    back = decode_tensors(json.loads(json.dumps(encode_tensors(tensors))))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_save_load_and_rebuild_source(tmp_path):
    loaded = load_model("builtin:small_resnet")
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    source_bn = {"bn1.running_mean": state["bn1.running_mean"].clone()}
    state["bn1.running_mean"] += 1.0
    meta = {"model": loaded.spec.to_dict(), "source_bn": encode_tensors(source_bn)}
    path = save_checkpoint(tmp_path / "a.safetensors", state, meta)
    got, got_meta = load_checkpoint(path)
    assert torch.equal(got["bn1.running_mean"], state["bn1.running_mean"])
    assert got_meta["format"] == "gprebn-edge/adapted-checkpoint"
    assert torch.equal(source_state_dict(got, got_meta)["bn1.running_mean"], source_bn["bn1.running_mean"])
    adapted, _ = rebuild_model(path, "adapted")
    source, _ = rebuild_model(path, "source")
    assert torch.equal(adapted.bn1.running_mean, state["bn1.running_mean"])
    assert torch.equal(source.bn1.running_mean, loaded.model.bn1.running_mean)
    assert not adapted.training and not source.training
    with pytest.raises(ArtifactError, match="which"):
        rebuild_model(path, "other")


def test_load_rejects_foreign_and_newer_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ArtifactError, match="not a gprebn-edge checkpoint"):
        load_checkpoint(plain)
    newer = tmp_path / "newer.safetensors"
    save_file({"x": torch.zeros(2)}, str(newer), metadata={
        "gprebn_edge": json.dumps({"format": "gprebn-edge/adapted-checkpoint", "format_version": 99})})
    with pytest.raises(ArtifactError, match="newer gprebn-edge"):
        load_checkpoint(newer)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(ArtifactError, match="not a safetensors checkpoint"):
        load_checkpoint(garbage)
    bad_json = tmp_path / "badjson.safetensors"
    save_file({"x": torch.zeros(2)}, str(bad_json), metadata={"gprebn_edge": "{"})
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_checkpoint(bad_json)


def test_save_refuses_other_suffixes(tmp_path):
    with pytest.raises(ArtifactError, match=".safetensors"):
        save_checkpoint(tmp_path / "a.pt", {"x": torch.zeros(1)}, {})


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            raise KeyboardInterrupt
    assert target.read_text() == "good" and len(list(tmp_path.iterdir())) == 1
    write_text_atomic(target, "new")
    assert target.read_text() == "new"


def test_atomic_write_needs_an_existing_folder(tmp_path):
    with pytest.raises(GprebnError, match="does not exist"):
        write_text_atomic(tmp_path / "no" / "x.txt", "x")
    with pytest.raises(GprebnError, match="is a directory"):
        write_text_atomic(tmp_path, "x")
