"""Train builtin:small_resnet on Fashion-MNIST (real photos; the Debian package dataset-fashion-mnist) for
benchmarks/fashion_accuracy.py, and write its weights with the command line and accuracies beside them.

    python scripts/train_fashion.py            # ~5 minutes with --threads 1 on 2 busy cores; writes
                                               # benchmarks/models/fashion_small_resnet.{safetensors,json}
The 60,000 training images are split by a seeded permutation into --val (5,000) validation images and the
rest for training; t10k is only scored (clean test accuracy), never trained or tuned on. Images enter as
32x32 RGB (gprebn_edge.data.idx.to_rgb32). Augmentation is geometric only (shifts of up to 2 pixels,
horizontal flips), so the corruptions and the inverted polarity of the benchmark stay unseen."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_builtin import augment, error  # noqa: E402

from gprebn_edge.data.idx import FASHION_MNIST_DIR, load_fashion_mnist, to_rgb32  # noqa: E402
from gprebn_edge.errors import GprebnError  # noqa: E402
from gprebn_edge.io import atomic_path, strict_json, write_text_atomic  # noqa: E402
from gprebn_edge.models.builtin import small_resnet  # noqa: E402
from gprebn_edge.models.spec import build_model  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "models" / "fashion_small_resnet.safetensors"


def flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right (garments and shoes look alike either way)."""
    mask = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
          gen: torch.Generator, report_epoch) -> None:
    """SGD with Nesterov momentum and a one-cycle schedule, as the built-in model was trained."""
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * math.ceil(len(x) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        seen, loss_sum, start = 0, 0.0, time.perf_counter()
        for i in range(0, len(perm), args.batch):
            batch = perm[i:i + args.batch]
            logits = model(flip(augment(x[batch], gen), gen))
            loss = F.cross_entropy(logits, y[batch], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(batch)
            loss_sum += loss.item() * len(batch)
            if (i // args.batch) % 100 == 0:
                print(f"  epoch {epoch + 1} step {i // args.batch}/{math.ceil(len(x) / args.batch)}: loss "
                      f"{loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        report_epoch(epoch, loss_sum / seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    ap.add_argument("--val", type=int, default=5000, help="training images held out for validation")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        train_images, train_labels = load_fashion_mnist("train", args.data)
        test_images, test_labels = load_fashion_mnist("t10k", args.data)
    except GprebnError as e:
        sys.exit(str(e))

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    _, preprocess = build_model("builtin:small_resnet")
    order = np.random.default_rng(args.seed).permutation(len(train_images))
    val_idx, fit_idx = order[:args.val], order[args.val:]
    train_rgb = to_rgb32(train_images)
    x = torch.from_numpy(preprocess.normalize(train_rgb[fit_idx]))
    y = torch.from_numpy(train_labels[fit_idx])
    val_images, val_labels = train_rgb[val_idx], train_labels[val_idx]

    model = small_resnet()
    start = time.perf_counter()
    history = []

    def report_epoch(epoch: int, loss: float) -> None:
        val = error(model, val_images, val_labels, preprocess)
        history.append({"epoch": epoch + 1, "loss": round(loss, 4), "val_error": val})
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  val error {100 * val:.2f} %  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

    train(model, x, y, args, gen, report_epoch)
    seconds = time.perf_counter() - start
    model.eval()
    test_rgb = to_rgb32(test_images)
    report = {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "model": "builtin:small_resnet",
        "train_images": len(fit_idx), "val_images": len(val_idx),
        "val_error": error(model, val_images, val_labels, preprocess),
        "test_error": error(model, test_rgb, test_labels, preprocess),
        "test_error_first_half": error(model, test_rgb[:5000], test_labels[:5000], preprocess),
        "test_error_second_half": error(model, test_rgb[5000:], test_labels[5000:], preprocess),
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__, "threads": args.threads,
        "history": history,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(f"clean validation accuracy {100 * (1 - report['val_error']):.2f} %, clean test (t10k) accuracy "
          f"{100 * (1 - report['test_error']):.2f} %, trained in {seconds:.0f} s")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        save_file(tensors, str(tmp), metadata={"training": strict_json(report)})
    write_text_atomic(args.out.with_suffix(".json"), strict_json(report, indent=1) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) and {args.out.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
