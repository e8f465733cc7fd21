"""How far frames sit from a model's BN statistics (gprebn_edge.device.readapt.input_shift): the figure the
device loop's gates compare with max_input_shift to decide that the serving or source model sees a domain it
does not know (gprebn_edge/device/gates.py).

    OMP_NUM_THREADS=1 python benchmarks/input_shift.py     # ~1 minute on 2 cores

The built-in model, GpreBN-adapted on 128 clean images (as the loop's tests start), and its unadapted source
model, on 32 and 96 test frames of each corruption at severity 5 and of clean frames at 0.05x exposure (the
collapse stream of benchmarks/loop_streams.py). Writes benchmarks/results/input_shift.{json,md}."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file  # noqa: E402
from gprebn_edge.checkpoint import rebuild_model  # noqa: E402
from gprebn_edge.data.preprocess import Preprocess  # noqa: E402
from gprebn_edge.data.sources import collect, open_source  # noqa: E402
from gprebn_edge.device.gates import GateConfig  # noqa: E402
from gprebn_edge.device.readapt import input_shift  # noqa: E402
from gprebn_edge.io import write_text_atomic  # noqa: E402

SHIFTS = ("clean", "fog", "gaussian_noise", "contrast", "shot_noise", "brightness", "impulse_noise")
EXPOSURE = 0.05
SIZES = (32, 96)


def measure() -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "start.safetensors"
        adapt_to_file("builtin:small_resnet", "synthetic:clean:n=128", start, AdaptConfig(batch_size=32))
        adapted, meta = rebuild_model(start, "adapted")
        source, _ = rebuild_model(start, "source")
    preprocess = Preprocess.from_dict(meta["preprocess"])
    rows = []
    for name in (*SHIFTS, f"clean x{EXPOSURE}"):
        spec = "synthetic:clean" if name.startswith("clean x") else f"synthetic:{name}" + ("" if name == "clean"
                                                                                          else ":5")
        images, _ = collect(open_source(f"{spec}:n={max(SIZES)}:split=test", preprocess, limit=max(SIZES)))
        if name.startswith("clean x"):
            images = images * EXPOSURE
        for n in SIZES:
            x = torch.from_numpy(np.ascontiguousarray(images[:n]))
            rows.append({"frames": name, "n": n, "adapted": input_shift(adapted, x), "source": input_shift(source, x)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "input_shift")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure()
    limit = GateConfig().max_input_shift
    lines = ["# Input shift: frames vs a model's BN statistics", "",
             "`OMP_NUM_THREADS=1 python benchmarks/input_shift.py`. Mean over BN layers of mean over channels of "
             "|mean of the layer's input over the frames - running mean| / running std. The gates' "
             f"max_input_shift is {limit}.", "",
             "| frames | n | adapted on clean | source |", "|---|---:|---:|---:|"]
    lines += [f"| {r['frames']} | {r['n']} | {r['adapted']:.3f} | {r['source']:.3f} |" for r in rows]
    print("\n".join(lines))
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_text_atomic(args.out.with_suffix(".json"), json.dumps({"max_input_shift": limit, "rows": rows},
                                                                 indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
