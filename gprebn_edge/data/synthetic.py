"""A procedural 10-class data set: 32x32 RGB digits 0-9 drawn from a small vector font.

Every image is one glyph under a random affine transform, stroke width and colours, rendered with
anti-aliased strokes from a distance-to-segment field. Two rendering styles share the font:

- ``"source"``: filled strokes on a smooth two-colour gradient, muted colours (the training domain);
- ``"style"``: hollow (outlined) strokes on a striped or checkered background in saturated colours,
  a natural-style shift that a person reads as the same digits but a source-trained model has not seen.

Everything is seeded numpy, so a split is the same bytes on every machine and needs no download.
"""

from __future__ import annotations

import numpy as np

from gprebn_edge.errors import InputError

__all__ = ["NUM_CLASSES", "IMAGE_SIZE", "SPLITS", "STYLES", "glyph_segments", "render", "make_split"]

NUM_CLASSES = 10
IMAGE_SIZE = 32
SPLITS = ("train", "val", "calib", "test")
STYLES = ("source", "style")

# Glyph height in pixels at scale 1: with +-3 px translation and 15 degrees of rotation the glyph stays
# (nearly) inside the 32 px frame.
_GLYPH_PX = 23.0
# Minimum luminance difference between the strokes and any background colour, so no digit is invisible.
_MIN_CONTRAST = 0.35
# Distance fields are computed on chunks of at most this many (image, segment, pixel) elements (~16 MB).
_CHUNK_ELEMENTS = 1 << 22
# Images composited at a time.
_RENDER_CHUNK = 2048


# ---------------------------------------------------------------- the font
# Glyph coordinates: x right, y down, the glyph centred on the origin in x in [-0.3, 0.3], y in [-0.5, 0.5].

def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float) -> np.ndarray:
    """Elliptic arc from angle a0 to a1 (degrees, y down so 90 is the bottom), 16 segments per turn."""
    n = max(2, int(np.ceil(abs(a1 - a0) / 22.5)))
    a = np.deg2rad(np.linspace(a0, a1, n + 1))
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], axis=1)


def _bezier(p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float], n: int = 8) -> np.ndarray:
    """Quadratic Bezier curve as an n-segment polyline."""
    t = np.linspace(0.0, 1.0, n + 1)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)


def _line(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


# Shapes are kept far apart on purpose: 1 has a flag and a base, 7 a full top bar and no base, 4 is
# closed, 6 and 9 differ by 180 degrees (rotation is only +-15), 0 is one oval and 8 two stacked loops.
_FONT: dict[int, list[np.ndarray]] = {
    0: [_arc(0.0, 0.0, 0.27, 0.48, 0, 360)],
    1: [_line((-0.16, -0.30), (0.04, -0.50), (0.04, 0.50)), _line((-0.16, 0.50), (0.24, 0.50))],
    2: [np.concatenate([_arc(0.0, -0.22, 0.26, 0.27, 190, 380), _line((-0.28, 0.50), (0.30, 0.50))])],
    3: [_arc(0.0, -0.25, 0.24, 0.25, -160, 90), _arc(0.0, 0.24, 0.27, 0.26, -90, 160)],
    4: [_line((0.30, 0.18), (-0.30, 0.18), (0.12, -0.50), (0.12, 0.50))],
    5: [np.concatenate([_line((0.28, -0.50), (-0.20, -0.50)), _arc(0.0, 0.20, 0.28, 0.30, -135, 150)])],
    6: [_bezier((0.22, -0.50), (-0.32, -0.36), (-0.28, 0.20)), _arc(0.0, 0.20, 0.28, 0.30, 0, 360)],
    7: [_line((-0.30, -0.50), (0.30, -0.50), (-0.06, 0.50))],
    8: [_arc(0.0, -0.26, 0.22, 0.24, 0, 360), _arc(0.0, 0.24, 0.27, 0.26, 0, 360)],
    9: [_arc(0.0, -0.20, 0.28, 0.30, 0, 360), _bezier((0.28, -0.20), (0.32, 0.36), (-0.22, 0.50))],
}


def glyph_segments(label: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end points, each (S, 2) in glyph coordinates, of the segments that draw one digit."""
    starts, ends = [], []
    for poly in _FONT[int(label)]:
        starts.append(poly[:-1])
        ends.append(poly[1:])
    return np.concatenate(starts), np.concatenate(ends)


_SEGMENTS = {d: glyph_segments(d) for d in range(NUM_CLASSES)}


# ---------------------------------------------------------------- rendering

def _pixel_grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each flattened to (H*W,)."""
    c = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    return x.ravel(), y.ravel()


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from every pixel centre to the nearest of the segments a->b; a, b are (N, S, 2) pixels.

    Returns (N, H*W) float32.
    """
    px, py = _pixel_grid()
    n, s = a.shape[:2]
    out = np.empty((n, px.size), np.float32)
    step = max(1, _CHUNK_ELEMENTS // (s * px.size))
    for i in range(0, n, step):
        ax, ay = a[i:i + step, :, 0, None], a[i:i + step, :, 1, None]
        ex, ey = b[i:i + step, :, 0, None] - ax, b[i:i + step, :, 1, None] - ay
        dx, dy = px - ax, py - ay
        # Projection of the pixel onto the segment, clamped to its end points; guard degenerate segments.
        t = np.clip((dx * ex + dy * ey) / np.maximum(ex * ex + ey * ey, 1e-6), 0.0, 1.0)
        dx -= t * ex
        dy -= t * ey
        out[i:i + step] = np.sqrt((dx * dx + dy * dy).min(axis=1))
    return out


def _affines(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random glyph->pixel maps: (N, 2, 2) linear parts and (N, 2) translations."""
    theta = np.deg2rad(rng.uniform(-15.0, 15.0, n))
    scale = rng.uniform(0.7, 1.0, n) * _GLYPH_PX
    aspect = rng.uniform(0.85, 1.15, n)
    shear = rng.uniform(-0.2, 0.2, n)
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shr = np.zeros((n, 2, 2))
    shr[:, 0, 0] = scale * aspect
    shr[:, 0, 1] = shear * scale
    shr[:, 1, 1] = scale
    shift = IMAGE_SIZE / 2 + rng.uniform(-3.0, 3.0, (n, 2))
    return rot @ shr, shift


def _hsv_colours(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV (each (N,) in [0, 1]) to RGB (N, 3) in [0, 1], via the closed-form hue ramp."""
    k = (h[:, None] * 6.0 + np.array([5.0, 3.0, 1.0])) % 6.0
    hue = np.clip(np.abs(k - 3.0) - 1.0, 0.0, 1.0)
    return v[:, None] * (1.0 - s[:, None] + s[:, None] * hue)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _palette(n: int, rng: np.random.Generator, style: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stroke colour and two background colours, each (N, 3), with the strokes contrasting both.

    Rejection sampling: redraw the images that fail until none do. It stays deterministic because the
    draws come from one generator in a fixed order.
    """
    if style == "source":
        sat, val = (0.0, 0.6), (0.05, 1.0)
    else:
        sat, val = (0.8, 1.0), (0.15, 1.0)

    def draw(m: int) -> np.ndarray:
        return _hsv_colours(rng.uniform(0, 1, m), rng.uniform(*sat, m), rng.uniform(*val, m))

    fg, bg1, bg2 = np.empty((n, 3)), np.empty((n, 3)), np.empty((n, 3))
    todo = np.arange(n)
    while todo.size:
        f, b1, b2 = draw(todo.size), draw(todo.size), draw(todo.size)
        lf, l1, l2 = _luma(f), _luma(b1), _luma(b2)
        ok = (np.abs(lf - l1) >= _MIN_CONTRAST) & (np.abs(lf - l2) >= _MIN_CONTRAST)
        if style == "style":
            # Both texture colours sit on the same side of the strokes and close to each other, so
            # the texture reads as background rather than as more strokes.
            ok &= ((l1 - lf) * (l2 - lf) > 0) & (np.abs(l1 - l2) <= 0.25)
        fg[todo[ok]], bg1[todo[ok]], bg2[todo[ok]] = f[ok], b1[ok], b2[ok]
        todo = todo[~ok]
    return fg, bg1, bg2


def _background(angle: np.ndarray, texture: tuple[np.ndarray, ...] | None) -> np.ndarray:
    """Per-pixel weight in [0, 1] of the second background colour, (N, H*W).

    angle (N,) orients the gradient or texture; texture is None for the source's smooth ramp, else
    (period, phase, is_checker), each (N,), for the style's stripes or checks.
    """
    px, py = _pixel_grid()
    angle = angle[:, None]
    u = np.cos(angle) * px + np.sin(angle) * py
    if texture is None:
        # A smooth linear ramp across the frame along a random direction.
        u = u - u.min(axis=1, keepdims=True)
        return u / u.max(axis=1, keepdims=True)
    period, phase, is_checker = (v[:, None] for v in texture)
    w = -np.sin(angle) * px + np.cos(angle) * py
    stripes = np.sin(2 * np.pi * (u / period + phase))
    checker = stripes * np.sin(2 * np.pi * (w / period + phase)) * 2.0
    wave = np.where(is_checker, checker, stripes)
    # A steep but anti-aliased square wave: hard-edged texture without jaggies.
    return np.clip(wave * 2.0 + 0.5, 0.0, 1.0)


def _glyph_distance(labels: np.ndarray, lin: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Distance from each pixel to its image's glyph, (N, H*W); images are grouped by digit so that
    every group shares one segment list."""
    dist = np.empty((labels.size, IMAGE_SIZE * IMAGE_SIZE), np.float32)
    for d in np.unique(labels):
        idx = np.flatnonzero(labels == d)
        a, b = _SEGMENTS[int(d)]
        m, t = lin[idx], shift[idx, None, :]
        pa = np.einsum("nij,sj->nsi", m, a) + t
        pb = np.einsum("nij,sj->nsi", m, b) + t
        dist[idx] = _distance(pa.astype(np.float32), pb.astype(np.float32))
    return dist


def render(labels: np.ndarray, rng: np.random.Generator, style: str = "source") -> np.ndarray:
    """Draw one digit per label; returns uint8 (N, 32, 32, 3)."""
    if style not in STYLES:
        raise InputError(f"unknown style {style!r}: use one of {', '.join(STYLES)}")
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise InputError(f"labels must lie in 0..{NUM_CLASSES - 1}")
    n = labels.size
    # Every random draw happens up front, so the images do not depend on the chunking below.
    lin, shift = _affines(n, rng)
    if style == "source":
        half_width = rng.uniform(0.9, 1.7, n)
    else:
        # Hollow strokes need a wider body so that the two outlines and the gap between them fit.
        half_width = rng.uniform(2.0, 2.6, n)
    fg, bg1, bg2 = _palette(n, rng, style)
    angle = rng.uniform(0.0, 2 * np.pi, n)
    texture = None
    if style == "style":
        texture = (rng.uniform(3.0, 6.0, n), rng.uniform(0.0, 1.0, n), rng.uniform(0.0, 1.0, n) >= 0.5)

    out = np.empty((n, IMAGE_SIZE * IMAGE_SIZE, 3), np.uint8)
    # Chunks bound the float temporaries to tens of MB whatever n is.
    for i in range(0, n, _RENDER_CHUNK):
        sl = slice(i, i + _RENDER_CHUNK)
        dist = _glyph_distance(labels[sl], lin[sl], shift[sl])
        hw = half_width[sl, None].astype(np.float32)
        if style == "source":
            # Coverage of a pixel by a stroke of half-width hw, linearly anti-aliased over one pixel.
            alpha = np.clip(hw - dist + 0.5, 0.0, 1.0)
        else:
            # Only the boundary of the stroke: a ~1.1 px line along the level set dist == hw.
            alpha = np.clip(0.55 - np.abs(dist - hw) + 0.5, 0.0, 1.0)
        tex = None if texture is None else tuple(v[sl] for v in texture)
        ramp = _background(angle[sl], tex)[..., None]
        alpha = alpha[..., None]
        bg = bg1[sl, None] * (1.0 - ramp) + bg2[sl, None] * ramp
        out[sl] = np.rint((bg * (1.0 - alpha) + fg[sl, None] * alpha) * 255.0)
    return out.reshape(n, IMAGE_SIZE, IMAGE_SIZE, 3)


def make_split(split: str, n: int, style: str = "source", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n images of one split: (uint8 (n, 32, 32, 3), int64 (n,) labels), the same bytes for the same args.

    Each (seed, split, style) has its own random stream, so splits never share an image. Labels cycle
    through the classes and are then shuffled, so every class has n // 10 or n // 10 + 1 images.
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if style not in STYLES:
        raise InputError(f"unknown style {style!r}: use one of {', '.join(STYLES)}")
    if n < 0:
        raise InputError(f"the number of images must be >= 0, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), STYLES.index(style)]))
    labels = rng.permutation(np.arange(n, dtype=np.int64) % NUM_CLASSES)
    return render(labels, rng, style), labels
