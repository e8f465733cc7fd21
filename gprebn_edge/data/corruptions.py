"""Common corruptions at CIFAR-10-C strength, on uint8 NHWC batches.

The corruptions and their five severity constants follow the 32x32 recipe of Hendrycks & Dietterich,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations" (ICLR 2019). The
filters they borrowed from scikit-image, OpenCV and SciPy are re-implemented here in numpy (and Pillow
for JPEG and box resizing) with the same border modes and kernels, so nothing beyond the core
dependencies is needed. Each corruption works on a whole batch at once; only JPEG and pixelate go
image by image through Pillow.

Results are rounded to the nearest uint8 (the original truncated), so a corruption that is the
identity on an image returns exactly that image.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Literal

import numpy as np
from PIL import Image

from gprebn_edge.errors import InputError

__all__ = [
    "CORRUPTIONS", "SEVERITIES", "corrupt", "rgb_to_hsv", "hsv_to_rgb", "gaussian_kernel", "filter1d",
    "filter2d", "disk", "plasma_fractal", "zoom_matrix",
]

SEVERITIES = (1, 2, 3, 4, 5)

Array = np.ndarray
# numpy pad modes: "edge" is SciPy's 'nearest', "reflect" is OpenCV's BORDER_REFLECT_101.
PadMode = Literal["edge", "reflect"]


# ---------------------------------------------------------------- helpers (pure numpy)

def rgb_to_hsv(rgb: Array) -> Array:
    """RGB in [0, 1] to HSV in [0, 1] along the last axis, as scikit-image's rgb2hsv."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    delta = v - rgb.min(axis=-1)
    safe = np.where(delta > 0, delta, 1.0)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1.0), 0.0)
    # Where two channels tie for the maximum, scikit-image lets blue win over green over red.
    h = np.select([b == v, g == v], [4.0 + (r - g) / safe, 2.0 + (b - r) / safe], (g - b) / safe)
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], axis=-1).astype(rgb.dtype, copy=False)


def hsv_to_rgb(hsv: Array) -> Array:
    """HSV in [0, 1] to RGB in [0, 1] along the last axis (the closed form of the six-sector formula)."""
    h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    k = (np.array([5.0, 3.0, 1.0], dtype=hsv.dtype) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> Array:
    """Normalised 1-D Gaussian with SciPy's radius int(truncate * sigma + 0.5)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def filter1d(x: Array, weights: Array, axis: int, mode: PadMode) -> Array:
    """Correlate x with an odd-length 1-D kernel along one axis, padding the border with mode."""
    r = len(weights) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode=mode)
    n = x.shape[axis]
    out = np.zeros_like(x)
    for i, w in enumerate(weights):
        if w != 0.0:
            out += w * np.take(xp, np.arange(i, i + n), axis=axis)
    return out


def filter2d(x: Array, kernel: Array, mode: PadMode = "reflect") -> Array:
    """Correlate each channel of NHWC x with an odd-sized 2-D kernel (OpenCV filter2D; its default
    border is BORDER_REFLECT_101, numpy's "reflect")."""
    kh, kw = kernel.shape
    h, w = x.shape[1:3]
    xp = np.pad(x, [(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)], mode=mode)
    out = np.zeros_like(x)
    for i in range(kh):
        for j in range(kw):
            if kernel[i, j] != 0.0:
                out += kernel[i, j] * xp[:, i:i + h, j:j + w]
    return out


def disk(radius: float, alias_blur: float) -> Array:
    """The defocus kernel: a normalised disk on a grid of at least 17x17, smoothed by a small Gaussian
    (3x3 up to radius 8, else 5x5, as the original), trimmed to its non-zero support. Sums to 1."""
    grid: Array = np.arange(-8, 8 + 1) if radius <= 8 else np.arange(-radius, radius + 1)
    ksize = 3 if radius <= 8 else 5
    xx, yy = np.meshgrid(grid, grid)
    k = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    k /= k.sum()
    # OpenCV's GaussianBlur kernel for a given ksize and sigma > 0, without SciPy's truncation rule.
    t = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(t**2) / (2 * alias_blur**2))
    g /= g.sum()
    k = filter1d(filter1d(k, g, 0, "reflect"), g, 1, "reflect")
    rows, cols = np.flatnonzero(k.any(axis=1)), np.flatnonzero(k.any(axis=0))
    # Trim symmetrically so the kernel's centre stays the centre.
    r = max(len(grid) // 2 - rows[0], len(grid) // 2 - cols[0])
    c = len(grid) // 2
    return k[c - r:c + r + 1, c - r:c + r + 1]


def plasma_fractal(n: int, mapsize: int, wibbledecay: float, rng: np.random.Generator) -> Array:
    """n diamond-square height maps (n, mapsize, mapsize) in [0, 1]; mapsize is a power of two.

    As in the original, the random offset at each level is wibble * U(-wibble, wibble), and wibble
    shrinks by wibbledecay per level, which sets how rough the fog looks.
    """
    assert mapsize & (mapsize - 1) == 0, "mapsize must be a power of two"
    m = np.zeros((n, mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: Array) -> Array:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        # Squares: each centre gets the mean of its four corners (the map wraps around).
        corners = m[:, 0::step, 0::step]
        acc = corners + np.roll(corners, -1, axis=1)
        acc = acc + np.roll(acc, -1, axis=2)
        m[:, half::step, half::step] = wibbled_mean(acc)
        # Diamonds: each edge midpoint gets the mean of its two corners and two centres.
        centres, corners = m[:, half::step, half::step], m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled_mean(
            centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2))
        m[:, half::step, 0::step] = wibbled_mean(
            centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1))
        step //= 2
        wibble /= wibbledecay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def zoom_matrix(n: int, factor: float) -> Array:
    """(n, n) linear map of the original's clipped_zoom along one axis: crop the middle ceil(n / factor),
    resize it linearly with corner-aligned sampling (SciPy's zoom, order 1) to round(crop * factor),
    then keep the middle n."""
    crop = int(np.ceil(n / factor))
    top = (n - crop) // 2
    out_len = int(round(crop * factor))
    pos = np.arange(out_len) * ((crop - 1) / (out_len - 1)) if out_len > 1 else np.zeros(1)
    trim = (out_len - n) // 2
    pos = pos[trim:trim + n] + top
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n - 1)
    hi = np.minimum(lo + 1, n - 1)
    frac = pos - lo
    m = np.zeros((n, n))
    np.add.at(m, (np.arange(n), lo), 1 - frac)
    np.add.at(m, (np.arange(n), hi), frac)
    return m


# ---------------------------------------------------------------- the corruptions
# Each takes float32 NHWC in [0, 1], the severity's constant and a generator; the caller clips.

def _gaussian_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    return x + rng.normal(0.0, c, x.shape).astype(x.dtype)


def _shot_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    return (rng.poisson(x * c) / c).astype(x.dtype)


def _impulse_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    # scikit-image's 's&p': each value flips with probability c, to 1 or 0 with even odds.
    flip = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    return np.where(flip, salt.astype(x.dtype), x)


def _speckle_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    return x + x * rng.normal(0.0, c, x.shape).astype(x.dtype)


def _gaussian_blur(x: Array, c: float, rng: np.random.Generator) -> Array:
    k = gaussian_kernel(c)
    return filter1d(filter1d(x, k, 1, "edge"), k, 2, "edge")


def _defocus_blur(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    return filter2d(x, disk(c[0], c[1]))


def _zoom_blur(x: Array, c: Array, rng: np.random.Generator) -> Array:
    n, h, w, ch = x.shape
    # Each zoom is linear in the image, vec(A x B^T) = (A kron B) vec(x), so the whole average is one
    # (HW, HW) matrix and one matmul. The unzoomed image is in the average too, next to zoom 1.0.
    op = np.eye(h * w)
    for z in c:
        op += np.kron(zoom_matrix(h, float(z)), zoom_matrix(w, float(z)))
    op = (op / (len(c) + 1)).astype(x.dtype)
    flat = x.transpose(1, 2, 0, 3).reshape(h * w, n * ch)
    return (op @ flat).reshape(h, w, n, ch).transpose(2, 0, 1, 3)


def _contrast(x: Array, c: float, rng: np.random.Generator) -> Array:
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) * c + mean


def _brightness(x: Array, c: float, rng: np.random.Generator) -> Array:
    hsv = rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0.0, 1.0)
    return hsv_to_rgb(hsv)


def _saturate(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    hsv = rgb_to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0.0, 1.0)
    return hsv_to_rgb(hsv)


def _fog(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    n, h, w = x.shape[:3]
    # CIFAR uses a 32x32 map; larger images get the next power of two and a crop, as ImageNet-C does.
    mapsize = max(32, 1 << (max(h, w) - 1).bit_length())
    fog = plasma_fractal(n, mapsize, c[1], rng)[:, :h, :w, None].astype(x.dtype)
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + c[0] * fog) * peak / (peak + c[0])


def _jpeg_compression(images: Array, c: int, rng: np.random.Generator) -> Array:
    out = np.empty_like(images)
    for i, im in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=c)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return out


def _pixelate(images: Array, c: float, rng: np.random.Generator) -> Array:
    h, w = images.shape[1:3]
    small = (int(w * c), int(h * c))
    out = np.empty_like(images)
    for i, im in enumerate(images):
        box = Image.Resampling.BOX
        out[i] = np.asarray(Image.fromarray(im).resize(small, box).resize((w, h), box))
    return out


# name -> (function, the five severity constants, whether it works on uint8 via Pillow)
_TABLE: dict[str, tuple[Callable, tuple, bool]] = {
    "gaussian_noise": (_gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10), False),
    "shot_noise": (_shot_noise, (500, 250, 100, 75, 50), False),
    "impulse_noise": (_impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07), False),
    "speckle_noise": (_speckle_noise, (0.06, 0.1, 0.12, 0.16, 0.2), False),
    "gaussian_blur": (_gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0), False),
    "defocus_blur": (_defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), False),
    # np.arange's floating-point end points are kept as the original has them: 1.06 and 1.11 are
    # included in the first two lists but 1.16, 1.21 and 1.26 are not in the last three.
    "zoom_blur": (_zoom_blur, tuple(np.arange(1, e, 0.01) for e in (1.06, 1.11, 1.16, 1.21, 1.26)), False),
    "contrast": (_contrast, (0.75, 0.5, 0.4, 0.3, 0.15), False),
    "brightness": (_brightness, (0.05, 0.1, 0.15, 0.2, 0.3), False),
    "saturate": (_saturate, ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)), False),
    "fog": (_fog, ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)), False),
    "jpeg_compression": (_jpeg_compression, (80, 65, 58, 50, 40), True),
    "pixelate": (_pixelate, (0.95, 0.9, 0.85, 0.75, 0.65), True),
}

CORRUPTIONS: tuple[str, ...] = tuple(_TABLE)


def corrupt(images: Array, name: str, severity: int, seed: int = 0) -> Array:
    """Apply one corruption at severity 1-5 to a uint8 NHWC RGB batch; the same seed gives the same bytes."""
    if name not in _TABLE:
        raise InputError(f"unknown corruption {name!r}: use one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise InputError(f"corruption severity must be one of 1, 2, 3, 4, 5, got {severity!r}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"corrupt() needs uint8 images shaped (N, H, W, 3), got {images.dtype} {images.shape}")
    fn, constants, on_uint8 = _TABLE[name]
    # The stream depends on the corruption and severity too, so one seed gives independent noise across them.
    rng = np.random.default_rng(np.random.SeedSequence([seed, CORRUPTIONS.index(name), severity]))
    c = constants[severity - 1]
    if on_uint8:
        return fn(images, c, rng)
    x = fn(images.astype(np.float32) / 255.0, c, rng)
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
