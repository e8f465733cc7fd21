"""Preprocessing: geometry (resize, center crop) on uint8 images, then scaling to [0, 1] and per-channel
normalization. numpy and Pillow only, so the runtime can share it without torch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from gprebn_edge.errors import InputError

__all__ = ["Preprocess", "IMAGENET_MEAN", "IMAGENET_STD", "parse_triple"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_triple(text: str, what: str) -> tuple[float, float, float]:
    """Parse 'a,b,c' (one value is repeated three times) for --mean / --std."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--{what} must be numbers like 0.485,0.456,0.406, got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise InputError(f"--{what} needs 1 or 3 comma-separated values, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"--{what} must be finite numbers, got {text!r}")
    if what == "std" and min(values) <= 0:
        raise InputError(f"--std values must be positive, got {text!r}")
    return (values[0], values[1], values[2])


@dataclass(frozen=True)
class Preprocess:
    """resize: shorter side to this many pixels (bilinear), as torchvision's Resize(int); crop: center crop
    to crop x crop; mean/std: per channel, for pixels scaled to [0, 1]."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise InputError(f"--{name} must be a positive number of pixels, got {v}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(resize=d.get("resize"), crop=d.get("crop"), mean=tuple(d["mean"]), std=tuple(d["std"]))

    def geometry(self, image: Image.Image) -> np.ndarray:
        """Resize and crop one RGB image; returns uint8 HWC."""
        if self.resize is not None:
            w, h = image.size
            scale = self.resize / min(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            if size != (w, h):
                image = image.resize(size, Image.Resampling.BILINEAR)
        if self.crop is not None:
            w, h = image.size
            if w < self.crop or h < self.crop:
                raise InputError(f"image of {w}x{h} is smaller than --crop {self.crop}: pass --resize {self.crop}")
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            image = image.crop((left, top, left + self.crop, top + self.crop))
        return np.asarray(image, dtype=np.uint8)

    def geometry_array(self, images: np.ndarray) -> np.ndarray:
        """geometry() over a uint8 NHWC batch; a no-op when no resize/crop is set or the size already fits."""
        if self.resize is None and self.crop is None:
            return images
        h, w = images.shape[1:3]
        if self.crop is not None and self.resize in (None, min(h, w)) and (h, w) == (self.crop, self.crop):
            return images
        return np.stack([self.geometry(Image.fromarray(im)) for im in images])

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> float32 NCHW, scaled to [0, 1] and normalized."""
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        x = (images.astype(np.float32) / np.float32(255.0) - mean) / std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
