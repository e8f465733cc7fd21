"""Would `--theta auto` help? Choosing theta (target vs source statistics) from the held-back images.

For each domain: adapt with GpreBN defaults (theta = 1) on the calibration images minus the 10 % that
`adapt` holds back, then mix the adapted model's statistics with the source statistics for each theta of
the grid (mean = theta mu_t + (1 - theta) mu_s, variance likewise, as GpreBN's own theta does; the adapted
gamma/beta stay) and pick theta on the held-back images by a label-free criterion:

- `min-entropy`: the lowest mean prediction entropy;
- `info-max`: the largest mutual information between image and prediction, H(mean p) - mean H(p) (high when
  predictions are confident *and* spread over the classes).

The table gives the deployed error (labeled test split) of theta = 1, of each criterion's pick, and of the
best theta in hindsight (oracle), on the built-in benchmark and on Fashion-MNIST. `--theta auto` is worth
keeping only if a criterion helps on both and costs at most 0.5 points on the clean domain.

    python benchmarks/theta_auto.py                 # ~25 min on 2 cores (Fashion-MNIST part needs
                                                    # apt-get install dataset-fashion-mnist)
Writes benchmarks/results/theta_auto.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from statistics import mean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, environment, environment_line, write_results  # noqa: E402
from accuracy import synthetic_data  # noqa: E402
from fashion_accuracy import WEIGHTS, fashion_data  # noqa: E402

from gprebn_edge.adaptation import AdaptConfig, adapt_and_freeze, evaluate  # noqa: E402
from gprebn_edge.data.corruptions import CORRUPTIONS  # noqa: E402
from gprebn_edge.data.holdout import split_holdout  # noqa: E402
from gprebn_edge.data.idx import load_fashion_mnist, to_rgb32  # noqa: E402
from gprebn_edge.errors import GprebnError  # noqa: E402
from gprebn_edge.health import holdout_size  # noqa: E402
from gprebn_edge.models.spec import batchnorm_layers, load_model  # noqa: E402

GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@torch.no_grad()
def mix(adapted: torch.nn.Module, source: torch.nn.Module, theta: float) -> torch.nn.Module:
    out = copy.deepcopy(adapted).eval()
    src = dict(batchnorm_layers(source))
    for name, bn in batchnorm_layers(out):
        s = src[name]
        bn.running_mean.mul_(theta).add_((1 - theta) * s.running_mean)
        bn.running_var.mul_(theta).add_((1 - theta) * s.running_var)
    return out


@torch.no_grad()
def criteria(model: torch.nn.Module, held: list[torch.Tensor]) -> dict[str, float]:
    p = torch.cat([model(x) for x in held]).double().softmax(1)
    ent = -(p * p.clamp_min(1e-300).log()).sum(1).mean()
    p_bar = p.mean(0)
    marginal = -(p_bar * p_bar.clamp_min(1e-300).log()).sum()
    return {"entropy": float(ent), "info_max": float(marginal - ent)}


def run_domain(model: torch.nn.Module, data, domain: str, severity: int | None) -> dict:
    calib, test = data(domain, severity)
    rest, head = split_holdout(calib, holdout_size(len(calib), 0.1))
    held = [torch.from_numpy(b.images) for b in head.batches(256)] if head is not None else []
    adapted, _, _ = adapt_and_freeze(model, rest, AdaptConfig())
    per_theta = []
    for theta in GRID:
        mixed = mix(adapted, model, theta)
        per_theta.append({"theta": theta, **criteria(mixed, held), "error": evaluate(mixed, test)["error"]})
    by = {t["theta"]: t for t in per_theta}
    pick_ent = min(per_theta, key=lambda t: t["entropy"])
    pick_im = max(per_theta, key=lambda t: t["info_max"])
    row = {"domain": domain + (f"-{severity}" if severity else ""), "per_theta": per_theta,
           "theta1": by[1.0]["error"], "min_entropy_theta": pick_ent["theta"], "min_entropy": pick_ent["error"],
           "info_max_theta": pick_im["theta"], "info_max": pick_im["error"],
           "oracle_theta": min(per_theta, key=lambda t: t["error"])["theta"],
           "oracle": min(t["error"] for t in per_theta), "source": by[0.0]["error"]}
    print(f"{row['domain']:22s} theta=1 {row['theta1']:6.1%}  min-entropy (theta {row['min_entropy_theta']}) "
          f"{row['min_entropy']:6.1%}  info-max (theta {row['info_max_theta']}) {row['info_max']:6.1%}  oracle "
          f"(theta {row['oracle_theta']}) {row['oracle']:6.1%}", flush=True)
    return row


def summary(rows: list[dict]) -> dict:
    shifted = [r for r in rows if r["domain"] != "clean"]
    clean = [r for r in rows if r["domain"] == "clean"]
    keys = ("theta1", "min_entropy", "info_max", "oracle")
    return {"shifted": {k: mean(r[k] for r in shifted) for k in keys} if shifted else None,
            "clean": {k: clean[0][k] for k in keys} if clean else None}


def markdown(payload: dict) -> str:
    lines = ["# `--theta auto`: choosing theta on the held-back images", "", f"`{payload['command']}`  ",
             environment_line(payload["environment"]), "",
             "Deployed error (%) on the labeled test split. Mean over the shifted domains, and the clean domain.",
             "", "| benchmark | domains | theta = 1 (default) | min-entropy pick | info-max pick | oracle theta |",
             "|---|---|---:|---:|---:|---:|"]
    for name, b in payload["benchmarks"].items():
        for part in ("shifted", "clean"):
            s = b["summary"][part]
            if s:
                lines.append(f"| {name} | {part} | {100 * s['theta1']:.2f} | {100 * s['min_entropy']:.2f} | "
                             f"{100 * s['info_max']:.2f} | {100 * s['oracle']:.2f} |")
    for name, b in payload["benchmarks"].items():
        lines += ["", f"## {name}", "", "| domain | theta = 1 | min-entropy | info-max | oracle | source |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in b["rows"]:
            lines.append(f"| {r['domain']} | {100 * r['theta1']:.1f} | {100 * r['min_entropy']:.1f} "
                         f"(theta {r['min_entropy_theta']}) | {100 * r['info_max']:.1f} "
                         f"(theta {r['info_max_theta']}) | {100 * r['oracle']:.1f} (theta {r['oracle_theta']}) | "
                         f"{100 * r['source']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-calib", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--builtin-domains", default=",".join([*CORRUPTIONS, "style", "clean"]))
    parser.add_argument("--fashion-domains", default="gaussian_noise,shot_noise,impulse_noise,speckle_noise,"
                        "gaussian_blur,contrast,fog,jpeg_compression,invert,texture,clean")
    parser.add_argument("--out", type=Path, default=RESULTS / "theta_auto")
    args = parser.parse_args()

    def domains(text: str) -> list[tuple[str, int | None]]:
        return [(d, None if d in ("clean", "style", "invert", "texture") else 5) for d in text.split(",") if d]

    benchmarks = {}
    builtin = load_model("builtin:small_resnet")
    data = synthetic_data(args.n_calib, args.n_test, builtin.preprocess)
    rows = [run_domain(builtin.model, data, d, s) for d, s in domains(args.builtin_domains)]
    benchmarks["built-in"] = {"rows": rows, "summary": summary(rows)}
    try:
        images, labels = load_fashion_mnist("t10k")
        fashion = load_model("builtin:small_resnet", WEIGHTS)
        fdata = fashion_data(to_rgb32(images), labels, args.n_calib, args.n_test, fashion.preprocess)
        rows = [run_domain(fashion.model, fdata, d, s) for d, s in domains(args.fashion_domains)]
        benchmarks["Fashion-MNIST"] = {"rows": rows, "summary": summary(rows)}
    except GprebnError as e:
        print(f"Fashion-MNIST left out ({e}): apt-get install dataset-fashion-mnist", flush=True)
    payload = {"command": command_line(), "environment": environment(), "grid": GRID, "benchmarks": benchmarks}
    write_results(args.out, payload, markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
