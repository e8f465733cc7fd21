"""The built-in digits: determinism, shapes, class balance, legibility proxies, and the style shift."""

from __future__ import annotations

import numpy as np
import pytest

from gprebn_edge.data.synthetic import (
    IMAGE_SIZE,
    NUM_CLASSES,
    SPLITS,
    STYLES,
    glyph_segments,
    make_split,
    render,
)
from gprebn_edge.errors import InputError


@pytest.mark.parametrize("style", STYLES)
def test_make_split_shapes_and_dtypes(style: str) -> None:
    images, labels = make_split("train", 50, style)
    assert images.shape == (50, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert labels.shape == (50,) and labels.dtype == np.int64


@pytest.mark.parametrize("style", STYLES)
def test_make_split_is_deterministic(style: str) -> None:
    a, la = make_split("val", 40, style, seed=3)
    b, lb = make_split("val", 40, style, seed=3)
    assert a.tobytes() == b.tobytes() and la.tobytes() == lb.tobytes()


def test_splits_seeds_and_styles_differ() -> None:
    batches = {split: make_split(split, 40)[0] for split in SPLITS}
    batches["seed1"] = make_split("train", 40, seed=1)[0]
    batches["style"] = make_split("train", 40, "style")[0]
    names = list(batches)
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            assert not np.array_equal(batches[p], batches[q]), (p, q)


def test_labels_balanced_and_shuffled() -> None:
    _, labels = make_split("train", 1003)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    assert counts.min() >= 100 and counts.max() <= 101
    assert not np.array_equal(labels[:20], np.arange(20) % NUM_CLASSES)


def test_empty_split() -> None:
    images, labels = make_split("test", 0)
    assert images.shape == (0, IMAGE_SIZE, IMAGE_SIZE, 3) and labels.shape == (0,)


@pytest.mark.parametrize("style", STYLES)
def test_every_image_has_a_visible_glyph(style: str) -> None:
    # Luminance range inside each image: the strokes contrast with the background by construction.
    images, _ = make_split("test", 200, style)
    luma = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    spread = luma.max(axis=(1, 2)) - luma.min(axis=(1, 2))
    assert spread.min() >= 0.3


def test_glyph_stays_in_frame() -> None:
    # The outer one-pixel border is mostly background: the glyph rarely touches the frame.
    images, _ = make_split("test", 200)
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    inner = images[:, 8:24, 8:24].reshape(200, -1, 3)
    # Strokes make the centre vary far more than the border, which is a smooth gradient.
    assert np.median(border.std(axis=1).mean(-1)) < np.median(inner.std(axis=1).mean(-1))


def test_font_fits_its_box_and_classes_differ() -> None:
    shapes = []
    for d in range(NUM_CLASSES):
        a, b = glyph_segments(d)
        pts = np.concatenate([a, b])
        assert np.all(np.abs(pts[:, 0]) <= 0.35) and np.all(np.abs(pts[:, 1]) <= 0.55)
        shapes.append(pts)
    # Render every digit with the same random draws: their coverage masks must all differ.
    masks = [render(np.array([d]), np.random.default_rng(0)) for d in range(NUM_CLASSES)]
    for i in range(NUM_CLASSES):
        for j in range(i + 1, NUM_CLASSES):
            diff = np.abs(masks[i].astype(int) - masks[j].astype(int)).mean()
            assert diff > 5.0, (i, j)


def test_style_is_a_shift() -> None:
    # The style domain uses saturated colours: a larger spread between channels than the source.
    src, _ = make_split("test", 300, "source")
    sty, _ = make_split("test", 300, "style")

    def chroma(x: np.ndarray) -> float:
        return float((x.max(-1).astype(int) - x.min(-1)).mean())

    assert chroma(sty) > 1.5 * chroma(src)


def test_render_accepts_any_label_order() -> None:
    labels = np.array([9, 0, 9, 3])
    images = render(labels, np.random.default_rng(1), "style")
    assert images.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: make_split("training", 10),
        lambda: make_split("train", 10, style="cartoon"),
        lambda: make_split("train", -1),
        lambda: render(np.array([10]), np.random.default_rng(0)),
        lambda: render(np.array([1]), np.random.default_rng(0), "cartoon"),
    ],
)
def test_invalid_arguments_raise(call) -> None:
    with pytest.raises(InputError):
        call()
