import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import Batch, collect, open_source
from gprebn_edge.errors import InputError

PLAIN = Preprocess()


def solid(path: Path, value: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> Path:
    """A solid-colour PNG (lossless, so the pixel value identifies the image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def noise_bytes(fmt: str, size: int = 64) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


def numbered_folder(root: Path, n: int) -> Path:
    """n images img_00.. whose red channel is their index: raw[:, 0, 0, 0] is the iteration order."""
    for i in range(n):
        solid(root / f"img_{i:02d}.png", (i, 0, 0))
    return root


def order_of(source, batch_size: int = 7) -> list[int]:
    return [int(v) for b in source.batches(batch_size) for v in b.raw[:, 0, 0, 0]]


def add_bad_files(root: Path, prefix: str = "zz") -> None:
    (root / f"{prefix}_corrupt.png").write_bytes(np.random.default_rng(1).bytes(500))
    (root / f"{prefix}_empty.jpg").write_bytes(b"")
    png = noise_bytes("PNG")
    (root / f"{prefix}_truncated.png").write_bytes(png[: len(png) // 2])


# ------------------------------------------------------------------------------------------ folders


def test_class_folders_give_labels_and_class_names(tmp_path):
    classes = ["cat", "dog", "zebra"]
    for c, name in enumerate(classes):
        for i in range(4):
            solid(tmp_path / name / ("nested" if i == 3 else "") / f"{i}.png", (10 * c, i, 0))
    (tmp_path / ".hidden").mkdir()
    solid(tmp_path / ".hidden" / "x.png", (1, 1, 1))
    src = open_source(str(tmp_path), PLAIN)
    assert len(src) == 12 and src.has_labels and src.class_names == classes
    for b in src.batches(5):
        assert b.labels.dtype == np.int64
        np.testing.assert_array_equal(b.raw[:, 0, 0, 0] // 10, b.labels)
    assert sorted(collect(src)[1].tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_unlabeled_folder(tmp_path):
    numbered_folder(tmp_path, 5)
    src = open_source(str(tmp_path), PLAIN)
    assert not src.has_labels and src.class_names is None
    assert all(b.labels is None for b in src.batches(2))
    assert collect(src)[1] is None


def test_mix_of_class_folders_and_loose_images(tmp_path):
    solid(tmp_path / "a" / "1.png", (0, 0, 0))
    solid(tmp_path / "loose.png", (0, 0, 0))
    with pytest.raises(InputError, match="mix of class folders and loose images"):
        open_source(str(tmp_path), PLAIN)


def test_shuffle_is_seeded_and_no_shuffle_keeps_sorted_order(tmp_path):
    numbered_folder(tmp_path, 30)
    a = order_of(open_source(str(tmp_path), PLAIN, seed=3))
    assert a == order_of(open_source(str(tmp_path), PLAIN, seed=3))
    assert a != order_of(open_source(str(tmp_path), PLAIN, seed=4))
    assert a != list(range(30)) and sorted(a) == list(range(30))
    assert order_of(open_source(str(tmp_path), PLAIN, shuffle=False)) == list(range(30))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P-transparent", "I;16"])
def test_modes_converted_to_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        data = rng.integers(0, 65536, (6, 8), dtype=np.uint16)
        im = Image.fromarray(data)
        assert im.mode == "I;16"
        expected = np.repeat(np.rint(data / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    elif mode.startswith("P"):
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        index = rng.integers(0, 256, (6, 8), dtype=np.uint8)
        im = Image.frombytes("P", (8, 6), index.tobytes())
        im.putpalette(palette.ravel().tolist())
        expected = palette[index]
    else:
        data = rng.integers(0, 256, (6, 8, len(mode)), dtype=np.uint8)
        im = Image.fromarray(data[..., 0] if mode == "L" else data)
        assert im.mode == mode
        gray = data[..., :1] if mode in ("L", "LA") else data[..., :3]
        expected = np.broadcast_to(gray, (6, 8, 3))
    im.save(tmp_path / "img.png", **({"transparency": 0} if mode == "P-transparent" else {}))
    batch = next(open_source(str(tmp_path), PLAIN).batches(1))
    assert batch.raw.shape == (1, 6, 8, 3) and batch.raw.dtype == np.uint8
    np.testing.assert_array_equal(batch.raw[0], expected)


def test_cmyk_jpeg_is_read_as_rgb(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    raw = next(open_source(str(tmp_path), PLAIN).batches(1)).raw
    assert raw.shape == (1, 6, 8, 3) and raw[0, 3, 3, 0] > 200 and raw[0, 3, 3, 1] < 60


def test_bad_files_are_skipped_counted_and_the_rest_yielded(tmp_path):
    numbered_folder(tmp_path, 9)
    add_bad_files(tmp_path)
    jpg = noise_bytes("JPEG")
    (tmp_path / "zz_truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    src = open_source(str(tmp_path), PLAIN, max_skip_fraction=0.5)
    assert len(src) == 13
    batches = list(src.batches(4))
    assert [len(b.raw) for b in batches] == [4, 4, 1]  # batches are refilled past skipped files
    assert sorted(order_of(src)) == list(range(9))
    reasons = dict(src.skipped)
    assert set(reasons) == {"zz_corrupt.png", "zz_empty.jpg", "zz_truncated.png", "zz_truncated.jpg"}
    assert "empty file" in reasons["zz_empty.jpg"] and "not a recognised image" in reasons["zz_corrupt.png"]
    assert "truncated" in reasons["zz_truncated.jpg"]
    list(src.batches(4))
    assert len(src.skipped) == 4 and src.describe()["skipped"] == 4  # re-iteration does not double count


def test_few_bad_files_pass_the_default_limit(tmp_path):
    numbered_folder(tmp_path, 37)
    add_bad_files(tmp_path)  # 3 of 40, sorted last
    images, _ = collect(open_source(str(tmp_path), PLAIN, shuffle=False))
    assert len(images) == 37


def test_too_many_bad_files(tmp_path):
    numbered_folder(tmp_path, 5)
    add_bad_files(tmp_path)
    with pytest.raises(InputError, match=r"3 of 8 images could not be read \(first: zz_\w+\.\w+: .*\); fix"):
        list(open_source(str(tmp_path), PLAIN, shuffle=False).batches(4))


def test_too_many_bad_files_stops_early(tmp_path):
    for i in range(30):
        (tmp_path / f"a_{i:02d}.png").write_bytes(b"not an image")
    numbered_folder(tmp_path, 30)
    with pytest.raises(InputError, match="20 of the first 20 images could not be read"):
        list(open_source(str(tmp_path), PLAIN, shuffle=False).batches(4))


def test_every_image_failing(tmp_path):
    add_bad_files(tmp_path)
    with pytest.raises(InputError, match="none of the 3 images"):
        list(open_source(str(tmp_path), PLAIN, max_skip_fraction=1.0).batches(4))


def test_no_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_sub").mkdir()
    with pytest.raises(InputError, match=r"no images found in .* \(looked for \.png, \.jpg"):
        open_source(str(tmp_path), PLAIN)


def test_missing_path_and_unknown_kind(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        open_source(str(tmp_path / "nope"), PLAIN)
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 10)
    with pytest.raises(InputError, match="expected a folder of images, a .npy/.npz file, synthetic"):
        open_source(str(tmp_path / "clip.mp4"), PLAIN)


def test_mixed_sizes(tmp_path):
    solid(tmp_path / "a.png", (1, 2, 3), size=(8, 6))
    solid(tmp_path / "b.JPG", (1, 2, 3), size=(20, 10))
    src = open_source(str(tmp_path), PLAIN, shuffle=False)
    with pytest.raises(InputError, match=r"a\.png is 8x6 but b\.JPG is 20x10\): pass --resize/--crop"):
        list(src.batches(2))
    with pytest.raises(InputError, match="pass --crop as well"):
        list(open_source(str(tmp_path), Preprocess(resize=6), shuffle=False).batches(2))
    batch = next(open_source(str(tmp_path), Preprocess(resize=6, crop=5)).batches(2))
    assert batch.raw.shape == (2, 5, 5, 3) and batch.images.shape == (2, 3, 5, 5)


def test_crop_larger_than_image_names_the_file(tmp_path):
    solid(tmp_path / "small.png", (0, 0, 0), size=(4, 4))
    with pytest.raises(InputError, match=r"small\.png: image of 4x4 is smaller than --crop 8"):
        list(open_source(str(tmp_path), Preprocess(crop=8)).batches(1))


def test_fingerprint_stable_and_content_sensitive(tmp_path):
    numbered_folder(tmp_path, 6)
    fp = open_source(str(tmp_path), PLAIN).fingerprint()
    assert fp.startswith("sha256:") and fp == open_source(str(tmp_path), PLAIN).fingerprint()
    assert fp != open_source(str(tmp_path), PLAIN, seed=1).fingerprint()  # order is part of the content
    solid(tmp_path / "img_03.png", (3, 0, 1))
    assert fp != open_source(str(tmp_path), PLAIN).fingerprint()


def test_reiteration_batch_sizes_limit_and_normalization(tmp_path):
    numbered_folder(tmp_path, 10)
    pre = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    src = open_source(str(tmp_path), pre)
    first, second = list(src.batches(4)), list(src.batches(4))
    assert [len(b.images) for b in first] == [4, 4, 2]
    for a, b in zip(first, second, strict=True):
        assert isinstance(a, Batch)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.raw, b.raw)
        assert a.images.dtype == np.float32 and a.images.shape == (len(a.raw), 3, 6, 8)
        np.testing.assert_array_equal(a.images, pre.normalize(a.raw))
    limited = open_source(str(tmp_path), pre, limit=3)
    assert len(limited) == 3 and order_of(limited) == order_of(src)[:3]
    assert len(open_source(str(tmp_path), pre, limit=100)) == 10
    with pytest.raises(InputError, match="--limit must be at least 1"):
        open_source(str(tmp_path), pre, limit=0)
    with pytest.raises(InputError, match="batch size must be at least 1"):
        src.batches(0)
    desc = json.loads(json.dumps(src.describe()))
    assert desc == {"spec": str(tmp_path), "kind": "folder", "count": 10, "has_labels": False,
                    "class_names": None, "skipped": 0, "shuffle": True, "seed": 0, "limit": None}


# ------------------------------------------------------------------------------------------- arrays


def rgb_stack(n: int = 10, h: int = 6, w: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_npy_uint8_nhwc(tmp_path):
    x = rgb_stack()
    np.save(tmp_path / "x.npy", x)
    src = open_source(str(tmp_path / "x.npy"), PLAIN, shuffle=False)
    assert len(src) == 10 and not src.has_labels and src.describe()["kind"] == "array"
    assert [len(b.raw) for b in src.batches(4)] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b.raw for b in src.batches(4)]), x)
    shuffled = np.concatenate([b.raw for b in open_source(str(tmp_path / "x.npy"), PLAIN).batches(4)])
    np.testing.assert_array_equal(shuffled, x[np.random.default_rng(0).permutation(10)])


@pytest.mark.parametrize("layout", ["float", "nhw", "nchw", "nchw1", "nhwc1"])
def test_npy_layouts_and_float(tmp_path, layout):
    x = rgb_stack()
    gray = x[..., 0]
    stored, expected = {
        "float": (x / 255.0, x),
        "nhw": (gray, np.repeat(gray[..., None], 3, axis=3)),
        "nchw": (x.transpose(0, 3, 1, 2), x),
        "nchw1": (gray[:, None], np.repeat(gray[..., None], 3, axis=3)),
        "nhwc1": (gray[..., None], np.repeat(gray[..., None], 3, axis=3)),
    }[layout]
    np.save(tmp_path / "x.npy", stored)
    raw = np.concatenate([b.raw for b in open_source(str(tmp_path / "x.npy"), PLAIN, shuffle=False).batches(3)])
    np.testing.assert_array_equal(raw, expected)


def test_npz_keys_labels_and_geometry(tmp_path):
    x, y = rgb_stack(), np.arange(10) % 3
    np.savez(tmp_path / "a.npz", images=x, labels=y)
    np.savez(tmp_path / "b.npz", x=x, y=y.astype(np.float32))
    np.savez(tmp_path / "c.npz", data=x)
    for name in ("a.npz", "b.npz"):
        src = open_source(str(tmp_path / name), PLAIN, shuffle=False)
        assert src.has_labels
        images, labels = collect(src, batch_size=4)
        assert images.shape == (10, 3, 6, 8) and labels.dtype == np.int64
        np.testing.assert_array_equal(labels, y)
    assert not open_source(str(tmp_path / "c.npz"), PLAIN).has_labels
    src = open_source(str(tmp_path / "a.npz"), Preprocess(resize=4, crop=4), limit=5)
    batches = list(src.batches(2))
    assert [b.raw.shape for b in batches] == [(2, 4, 4, 3), (2, 4, 4, 3), (1, 4, 4, 3)]
    order = np.random.default_rng(0).permutation(10)[:5]
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), y[order])


def test_array_fingerprint(tmp_path):
    x = rgb_stack()
    np.save(tmp_path / "x.npy", x)
    fp = open_source(str(tmp_path / "x.npy"), PLAIN).fingerprint()
    assert fp == open_source(str(tmp_path / "x.npy"), PLAIN).fingerprint()
    x[3, 0, 0, 0] ^= 1
    np.save(tmp_path / "x.npy", x)
    assert fp != open_source(str(tmp_path / "x.npy"), PLAIN).fingerprint()


@pytest.mark.parametrize(("content", "message"), [
    (np.full((2, 4, 4, 3), np.nan, np.float32), "NaN or Inf"),
    (np.full((2, 4, 4, 3), np.inf), "NaN or Inf"),
    (np.full((2, 4, 4, 3), 255.0), r"float values in \[255, 255\]: scale them to \[0, 1\] or store uint8"),
    (np.full((2, 4, 4, 3), 300, np.int32), "store uint8"),
    (np.zeros((2, 4), np.uint8), "has 2 dimensions"),
    (np.zeros((2, 4, 4, 3, 1), np.uint8), "has 5 dimensions"),
    (np.zeros((2, 5, 4, 4), np.uint8), "expected 1 or 3 channels"),
    (np.zeros((32, 32, 3), np.uint8), "looks like one HxWxC image"),
    (np.zeros((0, 4, 4, 3), np.uint8), "holds no images"),
])
def test_bad_arrays(tmp_path, content, message):
    np.save(tmp_path / "x.npy", content)
    with pytest.raises(InputError, match=message):
        open_source(str(tmp_path / "x.npy"), PLAIN)


def test_bad_npz(tmp_path):
    np.savez(tmp_path / "m.npz", images=rgb_stack(), labels=np.arange(9))
    with pytest.raises(InputError, match="has 10 images but 9 labels"):
        open_source(str(tmp_path / "m.npz"), PLAIN)
    np.savez(tmp_path / "k.npz", a=rgb_stack(), b=rgb_stack())
    with pytest.raises(InputError, match="put the images under 'images' or 'x'"):
        open_source(str(tmp_path / "k.npz"), PLAIN)
    np.savez(tmp_path / "n.npz", images=rgb_stack(), labels=-np.ones(10, int))
    with pytest.raises(InputError, match="non-negative integer class indices"):
        open_source(str(tmp_path / "n.npz"), PLAIN)
    (tmp_path / "junk.npy").write_bytes(b"junk" * 20)
    with pytest.raises(InputError, match="junk.npy"):
        open_source(str(tmp_path / "junk.npy"), PLAIN)


class _Trap:
    """Unpickling this creates a directory: proof that a loader ran pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_object_arrays_are_refused_without_unpickling(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    objects = np.empty(2, dtype=object)
    objects[:] = [_Trap(marker), _Trap(marker)]
    path = tmp_path / f"evil{suffix}"
    if suffix == ".npy":
        np.save(path, objects, allow_pickle=True)
    else:
        np.savez(path, images=objects)
    with pytest.raises(InputError, match="holds Python objects"):
        open_source(str(path), PLAIN)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize(("spec", "canonical"), [
    ("synthetic:gaussian_noise:5:n=20", "synthetic:gaussian_noise:5:n=20:split=calib:seed=0"),
    ("synthetic:clean:n=20:split=test", "synthetic:clean:n=20:split=test:seed=0"),
    ("synthetic:clean:3:n=20", "synthetic:clean:n=20:split=calib:seed=0"),  # severity unused there
    ("synthetic:gaussian_noise:2:seed=3:n=12", "synthetic:gaussian_noise:2:n=12:split=calib:seed=3"),
    ("synthetic:style:seed=1:n=12", "synthetic:style:n=12:split=calib:seed=1"),
])
def test_synthetic_specs(spec, canonical):
    src = open_source(spec, PLAIN)
    assert src.canonical == canonical and src.describe()["canonical"] == canonical
    assert src.has_labels and src.class_names == [str(d) for d in range(10)]
    images, labels = collect(src, batch_size=7)
    assert images.dtype == np.float32 and images.shape[:2] == (len(src), 3) and labels.dtype == np.int64
    assert src.fingerprint() == open_source(canonical, PLAIN).fingerprint()
    unshuffled = open_source(spec, PLAIN, shuffle=False, limit=5)  # shuffle is a no-op for synthetic data
    np.testing.assert_array_equal(collect(unshuffled)[0], images[:5])
    assert unshuffled.fingerprint() != src.fingerprint()


def test_synthetic_defaults_and_lazy_generation():
    src = open_source("synthetic:clean", PLAIN, limit=3)  # 2000 images, generated only when iterated
    assert len(src) == 3 and src.canonical == "synthetic:clean:n=2000:split=calib:seed=0"
    assert src.describe()["count"] == 3 and src.describe()["shuffle"] is False
    from gprebn_edge.data.sources import _parse_synthetic

    assert _parse_synthetic("synthetic:style") == {"domain": "style", "severity": 5, "n": 2000,
                                                   "split": "calib", "seed": 0}


@pytest.mark.parametrize(("spec", "message"), [
    ("synthetic:", "unknown synthetic domain '' .*choose one of .*clean"),
    ("synthetic:fog_of_war", "unknown synthetic domain 'fog_of_war'"),
    ("synthetic:gaussian_noise:0", "bad severity '0'.*SEVERITY one of 1, 2, 3, 4, 5"),
    ("synthetic:gaussian_noise:6", "bad severity '6'"),
    ("synthetic:gaussian_noise:n=5:3", "bad severity '3'"),
    ("synthetic:clean:size=4", "unknown key 'size'.*valid keys are n, split, seed"),
    ("synthetic:clean:n=5:n=6", "repeated key 'n'"),
    ("synthetic:clean:n=0", "n must be a positive integer"),
    ("synthetic:clean:seed=-1", "seed must be a non-negative integer"),
    ("synthetic:clean:split=holdout", "bad split 'holdout'.*train, val, calib, test"),
])
def test_bad_synthetic_specs(spec, message):
    with pytest.raises(InputError, match=message):
        open_source(spec, PLAIN)


def test_open_source_opens_the_shifting_stream_in_order():
    from gprebn_edge.data.sources import ShiftingStream

    source = open_source("stream:clean*8,fog-5*8", Preprocess(), shuffle=True, seed=3)
    assert isinstance(source, ShiftingStream) and len(source) == 16
    assert [s.name for s in source.segments()] == ["clean", "fog-5"]
    with pytest.raises(InputError, match="stream"):
        open_source("stream:fog-9*8", Preprocess())
