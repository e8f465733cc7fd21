"""Every input the tool reads images from: a folder of images, a .npy/.npz array file or built-in synthetic
data, behind one re-iterable ImageSource that yields preprocessed batches in a fixed order.
numpy and Pillow only, so the runtime can share it without torch."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.errors import InputError

__all__ = ["Batch", "ImageSource", "open_source", "collect", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_EXPECTED = "expected a folder of images, a .npy/.npz file or synthetic:DOMAIN[:SEVERITY]"
_MIN_SEEN = 20  # the skip fraction is judged only once this many images were tried (and at the end)
_CHUNK = 256  # images per chunk when validating or hashing arrays


@dataclass
class Batch:
    images: np.ndarray  # float32 NCHW, preprocessed
    labels: np.ndarray | None  # int64 (N,), None when the source has no labels
    raw: np.ndarray  # uint8 NHWC after geometry, before normalization


class ImageSource:
    """A finite stream of images in a fixed order (shuffled once, by seed); each batches() call replays it."""

    kind = "base"

    def __init__(self, spec: str, preprocess: Preprocess, n: int, *, shuffle: bool, seed: int,
                 limit: int | None) -> None:
        self.spec = spec
        self.preprocess = preprocess
        self.has_labels = False
        self.class_names: list[str] | None = None
        self.skipped: list[tuple[str, str]] = []
        self.shuffle = shuffle
        self.seed = seed
        self.limit = limit
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        self.order = order[:limit]
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.order)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        return self._batches(batch_size)

    def fingerprint(self) -> str:
        """sha256 over the content in iteration order; computed once."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            self._hash(h.update)
            self._fingerprint = "sha256:" + h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "count": len(self), "has_labels": self.has_labels,
                "class_names": self.class_names, "skipped": len(self.skipped), "shuffle": self.shuffle,
                "seed": self.seed if self.shuffle else None, "limit": self.limit}

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def _hash(self, update: Callable[[bytes], None]) -> None:
        raise NotImplementedError

    def _batch(self, raw: np.ndarray, labels: np.ndarray | None) -> Batch:
        return Batch(self.preprocess.normalize(raw), labels, raw)


# ----------------------------------------------------------------------------------------- image folders


class _Unreadable(Exception):
    """An image file that cannot be decoded; the reason is the message."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Alpha is dropped, as torchvision's loader does."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grayscale: rescale 0..65535 to 0..255 (Pillow's own convert would clip at 255)
        a = np.rint(np.clip(np.asarray(im, dtype=np.float64), 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(np.repeat(a[..., None], 3, axis=2))
    if im.mode == "F":
        f = np.nan_to_num(np.asarray(im, dtype=np.float64))
        f = f * 255.0 if f.max(initial=0.0) <= 1.0 else f  # float images are [0, 1] or already 0..255
        return Image.fromarray(np.repeat(np.rint(np.clip(f, 0, 255)).astype(np.uint8)[..., None], 3, axis=2))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow asks for this route for palettes with transparency
    return im if im.mode == "RGB" else im.convert("RGB")


def _read_rgb(path: Path) -> Image.Image:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _Unreadable(f"cannot read file: {e.strerror or e}") from None
    if not data:
        raise _Unreadable("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = _to_rgb(im)
            return rgb.copy() if rgb is im else rgb
    except UnidentifiedImageError:
        raise _Unreadable("not a recognised image format") from None
    except Exception as e:  # decoders raise many types on damaged files; none of them should end a run
        raise _Unreadable(f"{type(e).__name__}: {e}") from None


def _scan_folder(root: Path) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    """Sorted relative paths of the images under root, their labels and class names (as ImageFolder)."""
    found: list[str] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        found += [(rel_dir / f).as_posix() for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise InputError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    found.sort()
    loose = [f for f in found if "/" not in f]
    if len(loose) == len(found):
        return found, None, None
    if loose:
        raise InputError(f"{root} holds a mix of class folders and loose images ({', '.join(loose[:3])}"
                         f"{', ...' if len(loose) > 3 else ''}): move the loose images into a class folder, "
                         "or put all images in one folder with no class subfolders")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    index = {c: i for i, c in enumerate(classes)}
    return found, np.array([index[f.split("/", 1)[0]] for f in found], np.int64), classes


class FolderSource(ImageSource):
    kind = "folder"

    def __init__(self, root: Path, spec: str, preprocess: Preprocess, *, shuffle: bool, seed: int,
                 limit: int | None, max_skip_fraction: float) -> None:
        self.root = root
        self.files, self.labels, classes = _scan_folder(root)
        super().__init__(spec, preprocess, len(self.files), shuffle=shuffle, seed=seed, limit=limit)
        self.has_labels = self.labels is not None
        self.class_names = classes
        self.max_skip_fraction = max_skip_fraction
        self._skipped_set: set[str] = set()

    def _skip(self, rel: str, reason: str) -> None:
        if rel not in self._skipped_set:  # re-iteration meets the same bad files again
            self._skipped_set.add(rel)
            self.skipped.append((rel, reason))

    def _check_skips(self, bad: list[tuple[str, str]], seen: int, final: bool) -> None:
        if not bad:
            return
        first = f"first: {bad[0][0]}: {bad[0][1]}"
        if final and len(bad) == seen:
            raise InputError(f"none of the {seen} images in {self.root} could be read ({first}); "
                             "fix or remove them")
        if (final or seen >= _MIN_SEEN) and len(bad) > self.max_skip_fraction * seen:
            of = f"{seen}" if final else f"the first {seen}"
            raise InputError(f"{len(bad)} of {of} images could not be read ({first}); fix or remove them "
                             f"(at most {self.max_skip_fraction:.0%} may be skipped)")

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        bad: list[tuple[str, str]] = []
        ref: tuple[str, tuple[int, int], tuple[int, ...]] | None = None  # first good image: path, size, shape
        images: list[np.ndarray] = []
        labels: list[int] = []
        for seen, i in enumerate(self.order, start=1):
            rel = self.files[i]
            try:
                im = _read_rgb(self.root / rel)
            except _Unreadable as e:
                bad.append((rel, str(e)))
                self._skip(rel, str(e))
                self._check_skips(bad, seen, final=False)
                continue
            try:
                arr = self.preprocess.geometry(im)
            except InputError as e:
                raise InputError(f"{rel}: {e}") from None
            if ref is None:
                ref = (rel, im.size, arr.shape)
            elif arr.shape != ref[2]:
                raise InputError(self._size_message(ref[0], ref[1], rel, im.size))
            images.append(arr)
            if self.labels is not None:
                labels.append(int(self.labels[i]))
            if len(images) == batch_size:
                yield self._make(images, labels)
                images, labels = [], []
        self._check_skips(bad, len(self.order), final=True)
        if images:
            yield self._make(images, labels)

    def _make(self, images: list[np.ndarray], labels: list[int]) -> Batch:
        return self._batch(np.stack(images), np.array(labels, np.int64) if self.has_labels else None)

    def _size_message(self, a: str, size_a: tuple[int, int], b: str, size_b: tuple[int, int]) -> str:
        sizes = f"{a} is {size_a[0]}x{size_a[1]} but {b} is {size_b[0]}x{size_b[1]}"
        if self.preprocess.resize is None and self.preprocess.crop is None:
            return f"images differ in size ({sizes}): pass --resize/--crop to bring them to one size"
        return f"images differ in shape after --resize ({sizes}): pass --crop as well"

    def _hash(self, update: Callable[[bytes], None]) -> None:
        for i in self.order:
            rel = self.files[i]
            label = -1 if self.labels is None else int(self.labels[i])
            try:
                data = (self.root / rel).read_bytes()
            except OSError:
                data = b"<unreadable>"
            update(f"{rel}\0{label}\0{len(data)}\0".encode())
            update(data)


# -------------------------------------------------------------------------------------------- arrays


def _layout(shape: tuple[int, ...], name: str) -> str:
    if len(shape) == 3:
        if shape[-1] in (3, 4):
            raise InputError(f"{name} has shape {shape}, which looks like one HxWxC image: store a batch "
                             "(N, H, W, C), e.g. with np.expand_dims(x, 0)")
        return "nhw"
    if len(shape) == 4:
        if shape[-1] in (1, 3):
            return "nhwc"
        if shape[1] in (1, 3):
            return "nchw"
        raise InputError(f"{name} has shape {shape}: expected 1 or 3 channels, as (N, H, W, C) or "
                         "(N, C, H, W)")
    raise InputError(f"{name} has {len(shape)} dimensions (shape {shape}): expected images as (N, H, W, C), "
                     "(N, C, H, W) or grayscale (N, H, W)")


def _check_values(images: np.ndarray, name: str) -> None:
    """Reject non-finite values and ranges other than uint8 or [0, 1], chunk by chunk (may be a memmap)."""
    if images.dtype == np.uint8:
        return
    is_float = np.issubdtype(images.dtype, np.floating)
    if not (is_float or np.issubdtype(images.dtype, np.integer)):
        raise InputError(f"{name} has dtype {images.dtype}: store uint8 (0..255) or float in [0, 1]")
    for start in range(0, len(images), _CHUNK):
        x = np.asarray(images[start:start + _CHUNK])
        if is_float and not np.isfinite(x).all():
            raise InputError(f"{name} contains NaN or Inf values (near image {start}): fix the data")
        lo, hi = x.min(), x.max()
        if is_float and (lo < -0.01 or hi > 1.01):
            raise InputError(f"{name} holds float values in [{lo:.3g}, {hi:.3g}]: scale them to [0, 1] "
                             "or store uint8")
        if not is_float and (lo < 0 or hi > 255):
            raise InputError(f"{name} holds {images.dtype} values in [{lo}, {hi}]: store uint8 (0..255) "
                             "or float in [0, 1]")


def _check_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise InputError(f"labels in {name} have shape {labels.shape}: expected one class index per image")
    if len(labels) != n:
        raise InputError(f"{name} has {n} images but {len(labels)} labels: they must match one to one")
    if np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and (labels % 1 == 0).all():
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
        raise InputError(f"labels in {name} must be non-negative integer class indices")
    return labels.astype(np.int64)


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    refuse = (f"{path} holds Python objects (an object array or pickled data); it is not loaded, since "
              "unpickling can run arbitrary code: store a numeric uint8 or float array")
    try:
        obj = np.load(path, allow_pickle=False, mmap_mode="r")  # .npy stays on disk; batches read slices
        if isinstance(obj, np.ndarray):
            return obj, None
        with obj:
            keys = list(obj.files)
            label_key = next((k for k in ("labels", "y") if k in keys), None)
            image_key = next((k for k in ("images", "x") if k in keys), None)
            if image_key is None:
                rest = [k for k in keys if k != label_key]
                if len(rest) != 1:
                    raise InputError(f"{path} holds arrays {keys}: put the images under 'images' or 'x' "
                                     "(and labels under 'labels' or 'y')")
                image_key = rest[0]
            return obj[image_key], None if label_key is None else obj[label_key]
    except ValueError as e:
        if "pickle" in str(e) or "object" in str(e).lower():
            raise InputError(refuse) from None
        raise InputError(f"cannot read {path}: {e}") from None
    except (OSError, EOFError) as e:
        raise InputError(f"cannot read {path}: {e or type(e).__name__}") from None


class ArraySource(ImageSource):
    kind = "array"

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, spec: str, preprocess: Preprocess, *,
                 name: str, shuffle: bool, seed: int, limit: int | None) -> None:
        self.layout = _layout(images.shape, name)
        if len(images) == 0:
            raise InputError(f"{name} holds no images")
        _check_values(images, name)
        self.images = images
        self.labels = None if labels is None else _check_labels(labels, len(images), name)
        super().__init__(spec, preprocess, len(images), shuffle=shuffle, seed=seed, limit=limit)
        self.has_labels = self.labels is not None

    def _raw(self, idx: np.ndarray) -> np.ndarray:
        """Stored images at idx as uint8 NHWC, before geometry."""
        x = np.asarray(self.images[idx])
        if self.layout == "nhw":
            x = x[..., None]
        elif self.layout == "nchw":
            x = x.transpose(0, 2, 3, 1)
        if x.dtype != np.uint8:
            x = np.rint(np.clip(x, 0, 1) * 255) if np.issubdtype(x.dtype, np.floating) else x
            x = x.astype(np.uint8)
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        return np.ascontiguousarray(x)

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self.order), batch_size):
            idx = self.order[start:start + batch_size]
            raw = self.preprocess.geometry_array(self._raw(idx))
            yield self._batch(raw, None if self.labels is None else self.labels[idx])

    def _hash(self, update: Callable[[bytes], None]) -> None:
        update(f"{self.images.dtype.str}\0{self.images.shape[1:]}\0".encode())
        for start in range(0, len(self.order), _CHUNK):
            update(np.ascontiguousarray(self.images[self.order[start:start + _CHUNK]]).tobytes())
        if self.labels is not None:
            update(self.labels[self.order].tobytes())


# ---------------------------------------------------------------------------------------- synthetic data

_SYNTHETIC_KEYS = {"n": 2000, "split": "calib", "seed": 0}
_NO_SEVERITY = ("clean", "style")  # domains.load_domain ignores the severity of these


def _parse_synthetic(spec: str) -> dict:
    """'synthetic:DOMAIN[:SEVERITY][:key=value...]' -> domain, severity, n, split, seed (all checked)."""
    from gprebn_edge.data.corruptions import SEVERITIES
    from gprebn_edge.data.domains import DOMAINS
    from gprebn_edge.data.synthetic import SPLITS

    parts = spec.split(":")[1:]
    domain = parts[0] if parts else ""
    if domain not in DOMAINS:
        raise InputError(f"unknown synthetic domain {domain!r} in {spec!r}: choose one of "
                         f"{', '.join(DOMAINS)}")
    out: dict = {"domain": domain, "severity": 5, **_SYNTHETIC_KEYS}
    given: set[str] = set()
    for pos, part in enumerate(parts[1:], start=1):
        key, eq, value = part.partition("=")
        if not eq:
            if pos != 1 or not part.isdecimal() or int(part) not in SEVERITIES:
                raise InputError(f"bad severity {part!r} in {spec!r}: use synthetic:DOMAIN[:SEVERITY]"
                                 f"[:key=value...] with SEVERITY one of {', '.join(map(str, SEVERITIES))}")
            out["severity"] = int(part)
            continue
        if key not in _SYNTHETIC_KEYS or key in given:
            what = "repeated" if key in given else "unknown"
            raise InputError(f"{what} key {key!r} in {spec!r}: valid keys are n, split, seed")
        given.add(key)
        if key == "split":
            if value not in SPLITS:
                raise InputError(f"bad split {value!r} in {spec!r}: choose one of {', '.join(SPLITS)}")
            out["split"] = value
        elif not value.isdecimal() or (key == "n" and int(value) < 1):
            raise InputError(f"bad {key}={value!r} in {spec!r}: {key} must be a "
                             f"{'positive' if key == 'n' else 'non-negative'} integer")
        else:
            out[key] = int(value)
    return out


class SyntheticSource(ImageSource):
    """Built-in procedural data, generated on first use; already in random order, so never shuffled."""

    kind = "synthetic"

    def __init__(self, spec: str, preprocess: Preprocess, *, limit: int | None) -> None:
        self.params = p = _parse_synthetic(spec)
        severity = "" if p["domain"] in _NO_SEVERITY else f":{p['severity']}"
        self.canonical = f"synthetic:{p['domain']}{severity}:n={p['n']}:split={p['split']}:seed={p['seed']}"
        super().__init__(spec, preprocess, p["n"], shuffle=False, seed=0, limit=limit)
        self.has_labels = True
        self.class_names = [str(d) for d in range(10)]
        self._arrays: ArraySource | None = None

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        if self._arrays is None:
            from gprebn_edge.data.domains import load_domain

            p = self.params
            images, labels = load_domain(p["domain"], severity=p["severity"], split=p["split"], n=p["n"],
                                         seed=p["seed"])
            self._arrays = ArraySource(images, labels, self.canonical, self.preprocess, name=self.canonical,
                                       shuffle=False, seed=0, limit=self.limit)
        yield from self._arrays._batches(batch_size)

    def describe(self) -> dict:
        return {**super().describe(), "canonical": self.canonical}

    def _hash(self, update: Callable[[bytes], None]) -> None:
        update(f"{self.canonical}\0count={len(self)}".encode())


# ---------------------------------------------------------------------------------------------- entry


def open_source(spec: str, preprocess: Preprocess, *, shuffle: bool = True, seed: int = 0,
                limit: int | None = None, max_skip_fraction: float = 0.1) -> ImageSource:
    """Open a folder of images, a .npy/.npz file or synthetic:DOMAIN[:SEVERITY][:key=value...]."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise InputError(f"the fraction of unreadable images allowed must be in [0, 1], got "
                         f"{max_skip_fraction}")
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return SyntheticSource(spec, preprocess, limit=limit)
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"cannot read data from {spec}: no such file or directory ({_EXPECTED})")
    if path.is_dir():
        return FolderSource(path, spec, preprocess, shuffle=shuffle, seed=seed, limit=limit,
                            max_skip_fraction=max_skip_fraction)
    if path.suffix.lower() in (".npy", ".npz"):
        images, labels = _load_arrays(path)
        return ArraySource(images, labels, spec, preprocess, name=str(path), shuffle=shuffle, seed=seed,
                           limit=limit)
    raise InputError(f"cannot read data from {spec}: {_EXPECTED}")


def collect(source: ImageSource, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """All of a source's images (float32 NCHW) and labels (or None), concatenated."""
    batches = list(source.batches(batch_size))
    images = np.concatenate([b.images for b in batches])
    labels = np.concatenate([b.labels for b in batches]) if source.has_labels else None
    return images, labels
