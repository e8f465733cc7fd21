"""Train the built-in model (builtin:small_resnet) on the built-in source domain and write its weights.

    python scripts/train_builtin.py            # ~3-5 minutes on 2 CPU cores; writes
                                               # gprebn_edge/models/weights/small_resnet.safetensors
Reproducible: fixed seeds, fixed data. Prints the clean validation accuracy and the error under each
severity-5 corruption and the style shift (the figures quoted in the README)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gprebn_edge.data.corruptions import CORRUPTIONS
from gprebn_edge.data.domains import load_domain
from gprebn_edge.data.synthetic import make_split
from gprebn_edge.io import atomic_path, strict_json
from gprebn_edge.models.builtin import small_resnet
from gprebn_edge.models.spec import BUILTIN_WEIGHTS_DIR, build_model


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 pixels (reflect padding); geometry only, no photometric changes,
    so that the corruptions stay unseen."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dx = torch.randint(0, 5, (n,), generator=gen)
    dy = torch.randint(0, 5, (n,), generator=gen)
    rows = dy[:, None] + torch.arange(32)[None, :]
    cols = dx[:, None] + torch.arange(32)[None, :]
    idx = torch.arange(n)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def error(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, preprocess) -> float:
    model.eval()
    x = torch.from_numpy(preprocess.normalize(images))
    pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred.numpy() != labels).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=BUILTIN_WEIGHTS_DIR / "small_resnet.safetensors")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    _, preprocess = build_model("builtin:small_resnet")
    images, labels = make_split("train", args.train, seed=args.seed)
    x_all = torch.from_numpy(preprocess.normalize(images))
    y_all = torch.from_numpy(labels)
    val_images, val_labels = make_split("val", 2000, seed=args.seed)

    model = small_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * math.ceil(len(x_all) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            loss = F.cross_entropy(model(augment(x_all[idx], gen)), y_all[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        val = error(model, val_images, val_labels, preprocess)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {total / len(x_all):.4f}  val error {100 * val:.2f} %  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

    model.eval()
    report = {"clean_val_error": error(model, val_images, val_labels, preprocess),
              "train_seconds": round(time.perf_counter() - start, 1),
              "args": {k: str(v) for k, v in vars(args).items()}}
    for domain in ("style", *CORRUPTIONS):
        im, lb = load_domain(domain, 5, split="test", n=2000)
        report[f"{domain}-5"] = error(model, im, lb, preprocess)
    for k, v in report.items():
        if isinstance(v, float) and k != "train_seconds":
            print(f"{k:28s} {100 * v:6.2f} %")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        save_file(tensors, str(tmp), metadata={"training": strict_json(report)})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
