"""Adaptation health check: its false alarms on adaptations that help, and its catches on ones that hurt.

Each case adapts the built-in model with `adapt_model` (GpreBN defaults, batch 64, 10 % of the calibration
images held back) and records the health verdict next to the truth: the unadapted and the adapted model's
error on the domain's disjoint labeled test split (`split=test`, all classes). An adaptation "hurt" when
the adapted error is more than half a point (5 of 1000 test images) above the unadapted error.

- representative calibration sets: every corruption at severities 5 and 3, the style shift and the clean
  domain (`--n-calib` images of `split=calib`);
- unrepresentative ones: a single class of a domain (the calibration split filtered to one label), and
  one scene (one image of the domain seen `--n-calib` times under fresh noise: a camera watching one still
  scene); both are tested on the domain's full test split;
- a learning rate 1000x and 10,000x the default (a mistyped --lr) on every severity-5 corruption, at 128,
  512 and 1,000 calibration images: most end worse than the unadapted model, often far worse;
- a learning rate 1000x the default (collapse): must be refused by adapt_to_file.

The built-in data has labels, so `adapt` gives its verdict on them too (held-back accuracy before and
after). Each row records both verdicts: `verdict` (what adapt decides, labels included) and
`unsupervised` (the same check with the labels withheld, as for a folder without class subfolders).

Also records, per case, the mean statistics shift of the first and the last third of the BN layers (in
source standard deviations): a label-shifted calibration set moves the deep layers, a changed camera the
early ones.

    python benchmarks/health.py                    # ~25 min on 2 cores
    python benchmarks/health.py --quick            # a few cases, for a smoke test
Writes benchmarks/results/health.json and .md (or --out STEM)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from statistics import mean

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, environment, environment_line, write_results  # noqa: E402

from gprebn_edge.adaptation import AdaptationRefused, AdaptConfig, adapt_model, adapt_to_file, evaluate  # noqa: E402
from gprebn_edge.data.corruptions import CORRUPTIONS, corrupt  # noqa: E402
from gprebn_edge.data.domains import load_domain  # noqa: E402
from gprebn_edge.data.sources import open_source  # noqa: E402
from gprebn_edge.models.spec import load_model  # noqa: E402

MODEL = "builtin:small_resnet"
HURT_MARGIN = 0.005  # half a point: below that, a difference is a few test images


def _spec(domain: str, severity: int | None, split: str, n: int) -> str:
    sev = f":{severity}" if severity else ""
    return f"synthetic:{domain}{sev}:n={n}:split={split}"


def single_class(domain: str, severity: int | None, label: int, n: int, folder: Path) -> str:
    """The calibration split of a domain, only the images of one class, as an .npz."""
    images, labels = load_domain(domain, severity=severity or 5, split="calib", n=n)
    keep = labels == label
    path = folder / f"{domain}{severity or ''}-class{label}.npz"
    np.savez(path, images=images[keep], labels=labels[keep])
    return str(path)


def one_scene(domain: str, severity: int | None, noise: int, n: int, folder: Path) -> str:
    """One clean calibration image shown `n` times under fresh gaussian noise of severity `noise` (after the
    domain's own corruption, applied once)."""
    images, labels = load_domain(domain, severity=severity or 5, split="calib", n=1)
    scene = np.repeat(images[:1], n, axis=0)
    noisy = corrupt(scene, "gaussian_noise", noise, seed=1)
    path = folder / f"{domain}{severity or ''}-one-scene.npz"
    np.savez(path, images=noisy, labels=np.repeat(labels[:1], n))
    return str(path)


def run_case(name: str, kind: str, calib: str, test: str, config: AdaptConfig) -> dict:
    loaded = load_model(MODEL)
    source = open_source(calib, loaded.preprocess)
    result = adapt_model(loaded, source, config)
    health = result.summary["health"]
    if health["verdict"] == "non-finite":
        row = {"case": name, "kind": kind, "calibration": calib, "images": len(source), "verdict": "non-finite",
               "unsupervised": "non-finite", "signals": health["signals"], "hurt": True}
        print(f"{name:34s} non-finite", flush=True)
        return row
    test_source = open_source(test, loaded.preprocess)
    before = evaluate(loaded.model, test_source)["error"]
    after = evaluate(result.model, test_source)["error"]
    shifts = [r["mean_shift"] for r in result.metadata["statistics_shift"]]
    third = max(len(shifts) // 3, 1)
    labeled = health.get("labeled") or {}
    row = {"case": name, "kind": kind, "calibration": calib, "images": len(source),
           "verdict": health["verdict"], "unsupervised": health.get("unsupervised_verdict", health["verdict"]),
           "signals": health["signals"], "held_back": health["images"],
           "held_back_accuracy_before": labeled.get("accuracy_before"),
           "held_back_accuracy_after": labeled.get("accuracy_after"),
           "entropy_before": health["before"]["entropy"], "entropy_after": health["after"]["entropy"],
           "diversity_before": health["before"]["histogram_entropy"],
           "diversity_after": health["after"]["histogram_entropy"],
           "classes_before": health["before"]["classes_predicted"],
           "classes_after": health["after"]["classes_predicted"], "agreement": health["agreement"],
           "early_shift": mean(shifts[:third]), "late_shift": mean(shifts[-third:]),
           "test_error_unadapted": before, "test_error_adapted": after, "hurt": after > before + HURT_MARGIN}
    print(f"{name:34s} {row['verdict']:9s} ({row['unsupervised']:9s}) hurt={row['hurt']!s:5s} "
          f"error {before:6.1%} -> {after:6.1%}  "
          f"entropy {row['entropy_before']:.2f} -> {row['entropy_after']:.2f}  diversity "
          f"{row['diversity_before']:.2f} -> {row['diversity_after']:.2f}  shift early {row['early_shift']:.2f} "
          f"late {row['late_shift']:.2f}", flush=True)
    return row


def collapse_case(config: AdaptConfig, folder: Path) -> dict:
    """lr x 1000: adapt_to_file must refuse, and leave an existing file as it was."""
    out = folder / "collapse.safetensors"
    out.write_bytes(b"previous good artifact")
    lr = config.lr * 1000
    try:
        adapt_to_file(MODEL, _spec("fog", 5, "calib", 1000), out, AdaptConfig(lr=lr))
        refused, message = False, ""
    except AdaptationRefused as e:
        refused, message = True, str(e)
    kept = out.read_bytes() == b"previous good artifact"
    print(f"lr x1000 ({lr:g}): refused={refused} previous file kept={kept}: {message[:160]}", flush=True)
    return {"lr": lr, "refused": refused, "previous_file_kept": kept, "message": message}


def cases(args: argparse.Namespace, folder: Path) -> list[tuple[str, str, str, str, float]]:
    """(name, kind, calibration spec, test spec, lr multiplier)."""
    n, t = args.n_calib, args.n_test
    out: list[tuple[str, str, str, str, float]] = []
    domains = [(c, s) for c in args.corruptions for s in (5, 3)] + [("style", None), ("clean", None)]
    for domain, sev in domains:
        name = f"{domain}-{sev}" if sev else domain
        out.append((name, "representative", _spec(domain, sev, "calib", n), _spec(domain, sev, "test", t), 1))
    for domain, sev, label in [("clean", None, 0), ("clean", None, 7), ("fog", 5, 3), ("gaussian_noise", 5, 1),
                               ("contrast", 5, 5)][: args.bad_cases]:
        name = f"{domain}{'-' + str(sev) if sev else ''} class {label} only"
        out.append((name, "single class", single_class(domain, sev, label, 10 * n, folder),
                    _spec(domain, sev, "test", t), 1))
    for domain, sev in [("clean", None), ("fog", 5)][: max(args.bad_cases - 3, 0)]:
        name = f"{domain}{'-' + str(sev) if sev else ''} one scene"
        out.append((name, "one scene", one_scene(domain, sev, 3, 100, folder), _spec(domain, sev, "test", t), 1))
    for mult in args.lr_multipliers:
        for size in args.lr_sizes:
            for domain in args.lr_corruptions:
                out.append((f"{domain}-5 n={size} lr x{mult:g}", f"lr x{mult:g}", _spec(domain, 5, "calib", size),
                            _spec(domain, 5, "test", t), mult))
    return out


def confusion(rows: list[dict], key: str = "verdict") -> dict:
    flagged = [r for r in rows if r[key] not in ("ok", "unchecked")]
    hurt = [r for r in rows if r["hurt"]]
    return {"cases": len(rows), "hurt": len(hurt), "flagged": len(flagged),
            "refused": sum(1 for r in rows if r[key] in ("collapsed", "non-finite")),
            "caught": sum(1 for r in flagged if r["hurt"]), "missed": sum(1 for r in hurt if r not in flagged),
            "false_alarms": sum(1 for r in flagged if not r["hurt"])}


def markdown(payload: dict) -> str:
    lines = ["# Adaptation health check: false alarms and catches", "",
             f"`{payload['command']}`  ", environment_line(payload["environment"]), "",
             "Built-in model, GpreBN defaults (batch 64), 10 % of the calibration images held back. *hurt*: the "
             "adapted model's error on the domain's labeled test split (all classes) is more than 0.5 points above "
             "the unadapted model's. Entropy and class-histogram entropy (diversity) are on the held-back images, "
             "in nats.",
             "*flagged*: verdict suspect, collapsed or non-finite; *refused*: collapsed or non-finite (not written). "
             "*with labels*: the verdict `adapt` gives on this labeled data; *without labels*: the same check with "
             "the labels withheld.", ""]
    for key, title in (("verdict", "With labels"), ("unsupervised", "Without labels")):
        lines += [f"**{title}**", "", "| kind | cases | hurt | flagged | refused | caught | missed | false alarms |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for kind, c in payload["confusion"][key].items():
            lines.append(f"| {kind} | {c['cases']} | {c['hurt']} | {c['flagged']} | {c['refused']} | {c['caught']} | "
                         f"{c['missed']} | {c['false_alarms']} |")
        lines.append("")
    lines += ["| case | kind | verdict (without labels) | test error unadapted -> adapted | held-back accuracy | "
              "entropy | diversity | agreement | shift early / late |", "|---|---|---|---|---|---|---|---:|---|"]
    for r in payload["rows"]:
        if r["verdict"] == "non-finite":
            lines.append(f"| {r['case']} | {r['kind']} | non-finite | | | | | | |")
            continue
        acc = ("" if r["held_back_accuracy_before"] is None else
               f"{r['held_back_accuracy_before']:.0%} -> {r['held_back_accuracy_after']:.0%}")
        lines.append(f"| {r['case']} | {r['kind']} | {r['verdict']} ({r['unsupervised']}) | "
                     f"{r['test_error_unadapted']:.1%} -> {r['test_error_adapted']:.1%} | {acc} | "
                     f"{r['entropy_before']:.2f} -> {r['entropy_after']:.2f} | "
                     f"{r['diversity_before']:.2f} -> {r['diversity_after']:.2f} | {r['agreement']:.2f} | "
                     f"{r['early_shift']:.2f} / {r['late_shift']:.2f} |")
    c = payload["collapse"]
    lines += ["", f"lr x1000 ({c['lr']:g}): refused = {c['refused']}, previous file kept = "
              f"{c['previous_file_kept']}. Message: `{c['message']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    parser.add_argument("--n-calib", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--bad-cases", type=int, default=7, help="how many unrepresentative sets (0-7)")
    parser.add_argument("--lr-multipliers", default="1000,10000", help="--lr x these (comma-separated; '' for none)")
    parser.add_argument("--lr-sizes", default="128,512,1000", help="calibration images of the lr cases")
    parser.add_argument("--lr-corruptions", default=",".join(CORRUPTIONS), help="severity-5 domains of the lr cases")
    parser.add_argument("--quick", action="store_true", help="one shift, four bad sets, two lr cases, 300 images")
    parser.add_argument("--out", type=Path, default=RESULTS / "health")
    args = parser.parse_args()
    args.corruptions = args.corruptions.split(",")
    args.lr_multipliers = [float(m) for m in args.lr_multipliers.split(",") if m]
    args.lr_sizes = [int(m) for m in args.lr_sizes.split(",") if m]
    args.lr_corruptions = args.lr_corruptions.split(",")
    if args.quick:
        args.corruptions, args.n_calib, args.n_test, args.bad_cases = ["gaussian_noise"], 300, 300, 4
        args.lr_sizes, args.lr_corruptions = [128], ["gaussian_noise"]
    config = AdaptConfig()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_case(name, kind, calib, test, replace(config, lr=config.lr * mult))
                for name, kind, calib, test, mult in cases(args, Path(tmp))]
        collapse = collapse_case(config, Path(tmp))
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: k != "representative")
    payload = {"command": command_line(), "environment": environment(), "rows": rows, "collapse": collapse,
               "confusion": {key: {**{k: confusion([r for r in rows if r["kind"] == k], key) for k in kinds},
                                   "all": confusion(rows, key)} for key in ("verdict", "unsupervised")}}
    write_results(args.out, payload, markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
