"""benchmarks/fashion_accuracy.py on a tiny generated t10k (no dependency on the installed Fashion-MNIST)."""

from __future__ import annotations

import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from gprebn_edge.data.idx import to_rgb32
from gprebn_edge.data.preprocess import Preprocess
from gprebn_edge.data.sources import collect
from gprebn_edge.models.builtin import small_resnet

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fashion_accuracy  # noqa: E402

N = 24  # t10k stand-in: calibration from images 0..11, test from 12..23


def write_idx(path: Path, array: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.fixture
def t10k(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = np.zeros((N, 28, 28), np.uint8)
    images[:, 6:22, 8:20] = rng.integers(60, 256, (N, 16, 12), dtype=np.uint8)  # a bright item on black
    images[:, 0, 0] = np.arange(N)  # which image this is
    labels = (np.arange(N) % 10).astype(np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    return tmp_path, images, labels


def test_factory_splits_and_shifts(t10k) -> None:
    _, images, labels = t10k
    rgb = to_rgb32(images)
    pre = Preprocess()
    data = fashion_accuracy.fashion_data(rgb, labels.astype(np.int64), 5, 7, pre)
    calib, test = data("clean", None)
    assert isinstance(calib, fashion_accuracy.ArraySource)
    np.testing.assert_array_equal(calib.images, rgb[:5])
    np.testing.assert_array_equal(test.images, rgb[12:19])  # the disjoint second half
    np.testing.assert_array_equal(collect(test)[1], labels[12:19])
    inv_calib, _ = data("invert", None)
    np.testing.assert_array_equal(inv_calib.images, 255 - rgb[:5])
    tex, _ = data("texture", None)
    item = rgb[:5, 8:24, 10:22]
    assert (tex.images[:5, 8:24, 10:22] >= item).all() and (tex.images[:, :2] > 0).mean() > 0.9
    assert (tex.images[..., 0] == tex.images[..., 2]).all()  # a gray texture
    noisy_calib, noisy_test = data("gaussian_noise", 5)
    assert not np.array_equal(noisy_calib.images, rgb[:5])
    assert noisy_calib.images is data("gaussian_noise", 5)[0].images  # computed once per domain
    with pytest.raises(fashion_accuracy.InputError, match="between 1 and 12"):
        fashion_accuracy.fashion_data(rgb, labels, 13, 1, pre)


def test_grid_end_to_end(t10k, tmp_path: Path) -> None:
    root, _, _ = t10k
    weights = tmp_path / "w.safetensors"
    save_file(small_resnet().state_dict(), str(weights))
    out = tmp_path / "res" / "fashion"
    fashion_accuracy.main(["--data", str(root), "--weights", str(weights), "--methods", "source,adabn,gprebn",
                           "--domains", "clean,invert,texture,gaussian_noise", "--severities", "5",
                           "--batch-sizes", "4,1", "--n-calib", "8", "--n-test", "6", "--threads", "1",
                           "--out", str(out)])
    payload = json.loads(out.with_suffix(".json").read_text())
    assert len(payload["cells"]) == 4 * 3 * 2
    assert payload["summary"]["gprebn@1"].keys() == {"sev5", "invert", "texture", "clean"}
    assert payload["args"]["corruptions"] == ["gaussian_noise"]
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# Fashion-MNIST shift benchmark") and "| gprebn | 1 |" in md and "| invert |" in md


def test_missing_data_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        fashion_accuracy.main(["--data", str(tmp_path)])
    message = str(e.value.code)
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message
