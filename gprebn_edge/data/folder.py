"""Images read from a folder (flat, or one subfolder per class as ImageFolder), decoded with Pillow;
unreadable files are skipped up to a limit."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.source_base import Batch, ImageSource
from gprebn_edge.errors import InputError

__all__ = ["FolderSource", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_MIN_SEEN = 20  # the skip fraction is judged only once this many images were tried (and at the end)


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
            update(f"{rel}\0{label}\0{len(data)}\0".encode("utf-8", "surrogateescape"))  # non-UTF-8 names
            update(data)
