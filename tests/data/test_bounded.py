"""Images stream through: a pass decodes one batch ahead at most, never the whole set (issue 17)."""

import numpy as np
from PIL import Image

import gprebn_edge.data.folder as folder
from gprebn_edge.data.holdout import split_holdout
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import open_source


def _site(tmp_path, n=20):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
    return str(tmp_path)


def test_a_folder_pass_decodes_one_batch_at_a_time(tmp_path, monkeypatch):
    decoded = []
    real = folder._read_rgb
    monkeypatch.setattr(folder, "_read_rgb", lambda path: decoded.append(path) or real(path))
    source = open_source(_site(tmp_path), Preprocess())
    batches = source.batches(4)
    seen = 0
    for batch in batches:
        seen += len(batch.images)
        assert len(decoded) == seen  # nothing decoded ahead of the batch handed out, nothing kept behind
    assert seen == 20


def test_the_calibration_part_of_a_split_streams_too(tmp_path, monkeypatch):
    decoded = []
    real = folder._read_rgb
    source = open_source(_site(tmp_path), Preprocess())
    calib, held = split_holdout(source, 6)
    assert [len(b.images) for b in held.batches(4)] == [4, 2]  # the held-back slice, in batches of at most 4
    monkeypatch.setattr(folder, "_read_rgb", lambda path: decoded.append(path) or real(path))
    first = next(iter(calib.batches(4)))
    # skips the held-back 6 without keeping them; re-batching holds less than two batches
    assert len(first.images) == 4 and len(decoded) <= 6 + 2 * 4


def test_the_held_back_slice_is_read_when_checked_not_kept(tmp_path, monkeypatch):
    decoded = []
    real = folder._read_rgb
    monkeypatch.setattr(folder, "_read_rgb", lambda path: decoded.append(path) or real(path))
    source = open_source(_site(tmp_path), Preprocess())
    _, held = split_holdout(source, 6)
    assert decoded == []  # splitting reads nothing
    for k, batch in enumerate(held.batches(2), 1):
        assert len(batch.images) == 2
        assert len(decoded) == 2 * k  # one batch at a time
    assert len(decoded) == 6
