"""CIFAR-10-C corruptions and the named domains built from them."""

from __future__ import annotations

import numpy as np
import pytest

from gprebn_edge.data.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    corrupt,
    disk,
    filter1d,
    filter2d,
    gaussian_kernel,
    hsv_to_rgb,
    plasma_fractal,
    rgb_to_hsv,
    zoom_matrix,
)
from gprebn_edge.data.domains import DOMAINS, load_domain
from gprebn_edge.data.synthetic import make_split
from gprebn_edge.errors import InputError

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "fog")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return make_split("test", 64)[0]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


def _constant(value: int, n: int = 4) -> np.ndarray:
    return np.full((n, 32, 32, 3), value, np.uint8)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_and_determinism(images: np.ndarray, name: str) -> None:
    out = corrupt(images, name, 3, seed=7)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert out.tobytes() == corrupt(images, name, 3, seed=7).tobytes()
    if name in RANDOM:
        assert not np.array_equal(out, corrupt(images, name, 3, seed=8))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_grows(images: np.ndarray, name: str) -> None:
    d1 = _mad(corrupt(images, name, 1), images)
    d5 = _mad(corrupt(images, name, 5), images)
    assert d5 > 1.0, name
    assert d5 > d1, name


def test_input_is_not_modified(images: np.ndarray) -> None:
    before = images.copy()
    for name in CORRUPTIONS:
        corrupt(images, name, 5)
    assert np.array_equal(images, before)


# ---------------------------------------------------------------- closed forms

@pytest.mark.parametrize("name", ["contrast", "gaussian_blur", "defocus_blur", "zoom_blur", "pixelate"])
@pytest.mark.parametrize("severity", [1, 5])
def test_identity_on_constant_images(name: str, severity: int) -> None:
    flat = _constant(113)
    assert np.array_equal(corrupt(flat, name, severity), flat)


def test_jpeg_of_constant_image_is_nearly_exact() -> None:
    flat = _constant(113)
    assert np.abs(corrupt(flat, "jpeg_compression", 5).astype(int) - 113).max() <= 1


def test_contrast_reduces_std_and_keeps_mean(images: np.ndarray) -> None:
    out = corrupt(images, "contrast", 5).astype(np.float64)
    assert out.std(axis=(1, 2)).mean() < 0.2 * images.std(axis=(1, 2)).mean()
    np.testing.assert_allclose(out.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=1.0)


def test_brightness_raises_mean(images: np.ndarray) -> None:
    m0 = images.mean()
    m1, m5 = corrupt(images, "brightness", 1).mean(), corrupt(images, "brightness", 5).mean()
    assert m0 < m1 < m5


def test_brightness_of_black_is_gray() -> None:
    # V of black is 0, so +0.3 gives an achromatic 0.3 * 255.
    assert np.all(corrupt(_constant(0), "brightness", 5) == round(0.3 * 255))


def test_saturate_moves_saturation(images: np.ndarray) -> None:
    def sat(x: np.ndarray) -> float:
        return float(rgb_to_hsv(x.astype(np.float64) / 255)[..., 1].mean())

    assert sat(corrupt(images, "saturate", 2)) < sat(images) < sat(corrupt(images, "saturate", 5))


def test_gaussian_noise_std() -> None:
    out = corrupt(_constant(128, 32), "gaussian_noise", 5).astype(np.float64)
    assert abs((out - 128).std() - 0.10 * 255) < 0.5


def test_shot_noise_keeps_mean() -> None:
    out = corrupt(_constant(128, 32), "shot_noise", 5).astype(np.float64)
    assert abs(out.mean() - 128) < 0.5


def test_impulse_noise_rate() -> None:
    out = corrupt(_constant(128, 32), "impulse_noise", 5)
    changed = out != 128
    assert abs(changed.mean() - 0.07) < 0.005
    assert set(np.unique(out[changed])) == {0, 255}


def test_hsv_known_values_and_round_trip() -> None:
    rgb = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [0.5, 0.5, 0.5], [1, 1, 0]], np.float64)
    hsv = rgb_to_hsv(rgb)
    np.testing.assert_allclose(hsv, [[0, 1, 1], [1 / 3, 1, 1], [2 / 3, 1, 1], [0, 0, 0], [0, 0, 0.5],
                                     [1 / 6, 1, 1]], atol=1e-12)
    x = np.random.default_rng(0).random((1000, 3))
    np.testing.assert_allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-12)


def test_gaussian_kernel_matches_scipy_radius() -> None:
    assert len(gaussian_kernel(1.0)) == 9 and len(gaussian_kernel(0.4)) == 5
    assert gaussian_kernel(0.7).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("radius,alias", [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)])
def test_disk_kernel(radius: float, alias: float) -> None:
    k = disk(radius, alias)
    assert k.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(k, k.T, atol=1e-15)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)


def test_small_disk_is_the_alias_gaussian() -> None:
    # A disk of radius < 1 is one pixel, so the kernel is the 3x3 Gaussian of sigma alias_blur.
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.4**2))
    g /= g.sum()
    np.testing.assert_allclose(disk(0.3, 0.4), np.outer(g, g), atol=1e-15)


def test_filters_on_an_impulse() -> None:
    x = np.zeros((1, 9, 9, 1))
    x[0, 4, 4, 0] = 1.0
    k = np.arange(9, dtype=np.float64).reshape(3, 3)
    # Correlation (not convolution): the output around an impulse is the kernel flipped.
    np.testing.assert_allclose(filter2d(x, k)[0, 3:6, 3:6, 0], k[::-1, ::-1])
    w = np.array([0.25, 0.5, 0.25])
    np.testing.assert_allclose(filter1d(x, w, 1, "edge")[0, 3:6, 4, 0], w)


def test_zoom_matrix() -> None:
    np.testing.assert_allclose(zoom_matrix(32, 1.0), np.eye(32))
    m = zoom_matrix(32, 1.25)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    assert np.all(m >= 0)


def test_plasma_fractal_range() -> None:
    p = plasma_fractal(3, 32, 2.0, np.random.default_rng(0))
    assert p.shape == (3, 32, 32)
    np.testing.assert_allclose(p.min(axis=(1, 2)), 0.0)
    np.testing.assert_allclose(p.max(axis=(1, 2)), 1.0)


# ---------------------------------------------------------------- errors

def test_unknown_corruption_lists_names(images: np.ndarray) -> None:
    with pytest.raises(InputError, match="gaussian_noise") as err:
        corrupt(images, "snowstorm", 1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("severity", [0, 6, 2.5])
def test_bad_severity(images: np.ndarray, severity) -> None:
    with pytest.raises(InputError):
        corrupt(images, "contrast", severity)


def test_bad_images() -> None:
    with pytest.raises(InputError):
        corrupt(np.zeros((2, 32, 32, 3), np.float32), "contrast", 1)
    with pytest.raises(InputError):
        corrupt(np.zeros((32, 32, 3), np.uint8), "contrast", 1)


# ---------------------------------------------------------------- domains

def test_domains_list() -> None:
    assert DOMAINS[:2] == ("clean", "style") and set(CORRUPTIONS) <= set(DOMAINS)
    assert SEVERITIES == (1, 2, 3, 4, 5)


def test_load_domain_matches_its_parts() -> None:
    x, y = load_domain("clean", n=30)
    cx, cy = make_split("test", 30)
    assert np.array_equal(x, cx) and np.array_equal(y, cy)
    fx, fy = load_domain("fog", severity=2, n=30)
    assert np.array_equal(fy, cy) and not np.array_equal(fx, cx)
    sx, _ = load_domain("style", severity=1, n=30)
    assert np.array_equal(sx, load_domain("style", severity=5, n=30)[0])
    assert np.array_equal(sx, make_split("test", 30, "style")[0])


def test_load_domain_is_repeatable_with_fresh_noise_per_seed() -> None:
    a, _ = load_domain("impulse_noise", 3, "val", 30)
    assert np.array_equal(a, load_domain("impulse_noise", 3, "val", 30)[0])
    # Same clean images (seed 0) but a different corruption seed: the salt-and-pepper lands elsewhere.
    clean = make_split("val", 30)[0]
    other = corrupt(clean, "impulse_noise", 3, seed=0)
    assert not np.array_equal(a, other)


def test_load_domain_returns_copies() -> None:
    x, y = load_domain("contrast", n=20)
    x[:] = 0
    y[:] = -1
    x2, y2 = load_domain("contrast", n=20)
    assert x2.any() and (y2 >= 0).all()


@pytest.mark.parametrize("kwargs", [{"domain": "rain"}, {"domain": "fog", "severity": 9},
                                    {"domain": "clean", "split": "holdout"}, {"domain": "clean", "n": 0}])
def test_load_domain_errors(kwargs: dict) -> None:
    with pytest.raises(InputError):
        load_domain(**kwargs)
