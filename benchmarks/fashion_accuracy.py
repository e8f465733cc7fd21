"""The shift benchmark on real photos: Fashion-MNIST (Debian package dataset-fashion-mnist) with
builtin:small_resnet trained by scripts/train_fashion.py. Methods x domains x calibration batch sizes,
online and deployed error, computed by the same cell, grid, summary and markdown code as accuracy.py.

Calibration images are the first --n-calib of t10k's first half (images 0-4999), deployed-error test
images the first --n-test of its second half (5000-9999); no training image is used. Domains: the
project's corruptions (CIFAR-10-C constants) at each severity; `invert` (inverted polarity: the items as
if photographed on a white background) and `texture` (the items in front of a gray fractal texture
instead of black), which are no corruption of the photo; and `clean`.

    python benchmarks/fashion_accuracy.py --threads 1   # the committed run (~40 min on 2 shared cores)
    python benchmarks/fashion_accuracy.py --domains clean,invert --batch-sizes 64,1 --out /tmp/f
Writes benchmarks/results/fashion_accuracy.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402
from accuracy import (  # noqa: E402
    DataFactory,
    add_config_args,
    config_dict,
    config_from_args,
    domain_list,
    grid_lists,
    grid_payload,
    markdown,
    run_grid,
)

from gprebn_edge.data.arrays import ArraySource  # noqa: E402
from gprebn_edge.data.corruptions import CORRUPTIONS, corrupt, plasma_fractal  # noqa: E402
from gprebn_edge.data.idx import FASHION_MNIST_DIR, load_fashion_mnist, to_rgb32  # noqa: E402
from gprebn_edge.data.preprocess import Preprocess  # noqa: E402
from gprebn_edge.data.source_base import ImageSource  # noqa: E402
from gprebn_edge.errors import GprebnError, InputError  # noqa: E402
from gprebn_edge.models.spec import load_model  # noqa: E402

WEIGHTS = Path(__file__).resolve().parent / "models" / "fashion_small_resnet.safetensors"
SHIFTS = ("invert", "texture")            # natural shifts, not corruptions: no severity
NAMED = (*SHIFTS, "clean")
DEFAULT_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur",
                       "contrast", "fog", "jpeg_compression")


def on_texture(images: np.ndarray, seed: int) -> np.ndarray:
    """Each item in front of its own gray plasma texture (up to 60 % white) where the photo was black:
    the photo's brightness is the item's opacity, so bright parts keep their value."""
    rng = np.random.default_rng([seed, 0x7E87])
    texture = 0.6 * 255.0 * plasma_fractal(len(images), 32, 1.4, rng)[..., None]
    x = images.astype(np.float32)
    return np.rint(x + (1.0 - x / 255.0) * texture).astype(np.uint8)


def shift(images: np.ndarray, domain: str, severity: int | None, seed: int) -> np.ndarray:
    """One domain of 32x32 RGB uint8 images; `seed` decides the noise, so calib and test differ."""
    if domain == "clean":
        return images
    if domain == "invert":
        return 255 - images
    if domain == "texture":
        return on_texture(images, seed)
    assert severity is not None
    return corrupt(images, domain, severity, seed=seed)


def fashion_data(images: np.ndarray, labels: np.ndarray, n_calib: int, n_test: int, preprocess: Preprocess,
                 data_seed: int = 0) -> DataFactory:
    """(domain, severity) -> calibration source from the first half of `images` (t10k as 32x32 RGB), test
    source from the second half; each domain is computed once and kept while the grid runs through it."""
    half = len(images) // 2
    if not (1 <= n_calib <= half and 1 <= n_test <= len(images) - half):
        raise InputError(f"--n-calib and --n-test must be between 1 and {half} (each takes half of t10k), "
                         f"got {n_calib} and {n_test}")
    parts = {"calib": slice(0, n_calib), "test": slice(half, half + n_test)}

    @lru_cache(maxsize=2)
    def arrays(domain: str, severity: int | None, split: str) -> np.ndarray:
        seed = 2 * data_seed + (split == "test")
        return shift(images[parts[split]], domain, severity, seed)

    def data(domain: str, severity: int | None) -> tuple[ImageSource, ImageSource]:
        sources = []
        for split in ("calib", "test"):
            name = f"fashion-mnist:t10k:{split}:{domain}{'-' + str(severity) if severity else ''}"
            sources.append(ArraySource(arrays(domain, severity, split), labels[parts[split]], name, preprocess,
                                       name=name, shuffle=False, seed=0, limit=None))
        return sources[0], sources[1]
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default=",".join([*NAMED, *DEFAULT_CORRUPTIONS]),
                    help=f"any of {', '.join(NAMED)} and the corruptions {', '.join(CORRUPTIONS)}")
    ap.add_argument("--n-calib", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--data", type=Path, default=FASHION_MNIST_DIR, help="folder of the t10k idx.gz files")
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the corruption noise and textures")
    ap.add_argument("--out", type=Path, default=RESULTS / "fashion_accuracy")
    add_config_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.domains.split(",")
    unknown = [d for d in names if d not in (*NAMED, *CORRUPTIONS)]
    if unknown:
        ap.error(f"unknown domain {unknown[0]!r}: use {', '.join(NAMED)} or a corruption")
    methods, batches, severities = grid_lists(args)
    try:
        config = config_from_args(args)
        images, labels = load_fashion_mnist("t10k", args.data)
        loaded = load_model("builtin:small_resnet", args.weights)
        data = fashion_data(to_rgb32(images), labels, args.n_calib, args.n_test, loaded.preprocess, args.data_seed)
    except GprebnError as e:
        sys.exit(f"fashion_accuracy: {e}")

    start = time.perf_counter()
    cells = run_grid(loaded.model, domain_list(names, severities, NAMED), methods, batches, config, data)
    payload = grid_payload({
        "methods": methods, "batch_sizes": batches, "severities": severities,
        "corruptions": [d for d in names if d not in NAMED], "shifts": [d for d in names if d in NAMED],
        "n_calib": args.n_calib, "n_test": args.n_test, "data_seed": args.data_seed,
        "data": "Fashion-MNIST t10k: calibration images 0..n_calib-1, test images 5000..5000+n_test-1",
        "weights": args.weights.name, "weights_sha256": loaded.spec.weights_sha256,
        "config": config_dict(config)}, start, cells, named=NAMED)
    notes = ("Fashion-MNIST t10k as 32x32 RGB (zero-padded, gray replicated): calibration images 0.."
             f"{args.n_calib - 1}, test images 5000..{5000 + args.n_test - 1}. `invert`: inverted polarity "
             "(white background); `texture`: items in front of a gray fractal texture; neither is a "
             "corruption. `bn` and `tent` ship static models by re-estimating the statistics on the "
             "calibration data.", "")
    md = markdown(payload, title="Fashion-MNIST shift benchmark",
                  model=f"builtin:small_resnet with {WEIGHTS.parent.name}/{args.weights.name}", notes=notes)
    write_results(args.out, payload, md)
    print(md)


if __name__ == "__main__":
    main()
