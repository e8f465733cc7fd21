"""Named test domains over the built-in digits: the clean source style, the natural-style shift, and every
corruption at a chosen severity. One function, ``load_domain``, so benchmarks and the CLI name a domain
with a string."""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

from gprebn_edge.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from gprebn_edge.data.synthetic import SPLITS, make_split
from gprebn_edge.errors import InputError

__all__ = ["DOMAINS", "load_domain"]

DOMAINS: tuple[str, ...] = ("clean", "style", *CORRUPTIONS)

# Domains at least this small are cached: benchmarks reload the same few thousand images per method.
_CACHE_MAX_N = 10_000


def _corruption_seed(seed: int, split: str, domain: str, severity: int) -> int:
    """A seed for the corruption noise that differs per (seed, split, domain, severity) and is stable
    across runs (unlike hash(), which Python salts per process)."""
    return zlib.crc32(f"{seed}/{split}/{domain}/{severity}".encode())


@lru_cache(maxsize=32)
def _load(domain: str, severity: int, split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if domain == "style":
        return make_split(split, n, "style", seed)
    images, labels = make_split(split, n, "source", seed)
    if domain != "clean":
        images = corrupt(images, domain, severity, seed=_corruption_seed(seed, split, domain, severity))
    return images, labels


def load_domain(domain: str, severity: int = 5, split: str = "test", n: int = 1000,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n images of one domain and split: (uint8 (n, 32, 32, 3), int64 (n,) labels).

    The labels and the underlying glyphs of "clean" and every corruption are the same for the same
    split, n and seed, so accuracies across domains compare like with like. severity (1-5) applies to
    the corruptions only.
    """
    if domain not in DOMAINS:
        raise InputError(f"unknown domain {domain!r}: use one of {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if severity not in SEVERITIES:
        raise InputError(f"severity must be one of 1, 2, 3, 4, 5, got {severity!r}")
    if n <= 0:
        raise InputError(f"the number of images must be positive, got {n}")
    if domain in ("clean", "style"):
        severity = 5  # ignored there; one cache entry whatever the caller passed
    if n > _CACHE_MAX_N:
        return _load.__wrapped__(domain, severity, split, n, seed)
    images, labels = _load(domain, severity, split, n, seed)
    # Copies, so a caller that edits its batch in place cannot change what the next caller gets.
    return images.copy(), labels.copy()
