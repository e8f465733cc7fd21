"""The serving part works where PyTorch is not installed (`pip install gprebn-edge`, without the `adapt`
extra): `bench`, `compare`, `info` of an export and a serve-only `loop` run the real CLI in a subprocess that
cannot import torch or torchvision, and nothing there even tries to; the commands that need torch stop with
one line naming the extra. The ONNX files are made here, in the test process, which has torch."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gprebn_edge.adaptation import AdaptConfig, adapt_to_file
from gprebn_edge.export.pipeline import export_artifact

TIMEOUT = 120  # seconds per command; each takes a few
DATA = "synthetic:fog:5:n=64"

# Imported by Python at start-up from the first PYTHONPATH entry: torch and torchvision become unimportable, as
# on a box without them, and every attempt is written to $BLOCKED_LOG (one name a line).
SITECUSTOMIZE = textwrap.dedent("""
    import os
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                with open(os.environ["BLOCKED_LOG"], "a") as log:
                    log.write(name + "\\n")
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, BlockTorch())
""")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("torch_free")
    checkpoint = folder / "adapted.safetensors"
    adapt_to_file("builtin:small_resnet", DATA, checkpoint, AdaptConfig(batch_size=32))
    adapted = export_artifact(checkpoint, folder / "adapted.onnx", check_images=32)
    source = export_artifact(checkpoint, folder / "source.onnx", unadapted=True, check_images=32)
    return {"checkpoint": checkpoint, "adapted": Path(adapted["onnx"]), "source": Path(source["onnx"])}


@pytest.fixture
def cli(tmp_path):
    """cli(*args) -> (CompletedProcess, [blocked imports]): gprebn-edge run without torch, in tmp_path."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "blocked.log"
    env = {**os.environ, "BLOCKED_LOG": str(log), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(block), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def run(*args: object) -> tuple[subprocess.CompletedProcess, list[str]]:
        log.write_text("")
        proc = subprocess.run([sys.executable, "-c", "from gprebn_edge.cli import main; main()", *map(str, args)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        return proc, log.read_text().split()

    return run


def test_torch_is_blocked(cli):
    proc, blocked = cli("adapt", "--help")  # typer parses, then any import of torch is refused
    assert proc.returncode == 0 and blocked == []
    check = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, "PYTHONPATH": ""},
                           capture_output=True, timeout=TIMEOUT)
    assert check.returncode == 0  # the test process's own Python has torch: the block is what removes it


@pytest.mark.parametrize("command", ["", "adapt", "info", "export", "bench", "compare", "loop", "loop-report",
                                     "demo"])
def test_help_without_torch(cli, command):
    proc, blocked = cli(*filter(None, [command]), "--help")
    assert proc.returncode == 0 and "Usage" in proc.stdout and blocked == []


def test_bench_and_info_without_torch(cli, exports, tmp_path):
    proc, blocked = cli("bench", exports["adapted"], "--iters", "5", "--batch", "1,2", "--json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    assert blocked == [] and "Traceback" not in proc.stderr
    assert "p50" in proc.stdout and "onnxruntime" in proc.stdout
    assert [r["batch"] for r in json.loads((tmp_path / "b.json").read_text())["results"]] == [1, 2]
    proc, blocked = cli("info", exports["adapted"])
    assert proc.returncode == 0 and blocked == [], proc.stderr
    assert "10 classes" in proc.stdout and "adapted" in proc.stdout


def test_compare_without_torch(cli, exports, tmp_path):
    proc, blocked = cli("compare", exports["source"], exports["adapted"], "--data", "synthetic:fog:5:n=48:split=test",
                        "--latency-iters", "4", "--json", tmp_path / "c.json")
    assert proc.returncode == 0, proc.stderr
    assert blocked == [] and "Traceback" not in proc.stderr
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["images"] == 48 and result["has_labels"] and 0 <= result["agreement"] <= 1


def test_serve_only_loop_without_torch(cli, exports, tmp_path):
    state = tmp_path / "state"
    proc, blocked = cli("loop", "--onnx", exports["adapted"], "--state", state, "--source", "stream", "--frames", "300",
                        "--window", "100")
    assert proc.returncode == 0, proc.stderr
    assert blocked == [] and "Traceback" not in proc.stderr
    assert "300 frames" in proc.stdout and "rounds 0" in proc.stdout
    events = [json.loads(line)["event"] for line in (state / "metrics.jsonl").read_text().splitlines()]
    assert events == ["start", "window", "window", "window", "stop"]
    proc, blocked = cli("loop-report", state / "metrics.jsonl")
    assert proc.returncode == 0 and blocked == [], proc.stderr


@pytest.mark.parametrize("command", ["adapt", "export", "info", "loop", "demo", "compare"])
def test_commands_that_need_torch_name_the_extra(cli, exports, tmp_path, command):
    args = {"adapt": ["--model", "builtin:small_resnet", "--data", DATA, "-o", tmp_path / "x.safetensors"],
            "export": [exports["checkpoint"], "--onnx", tmp_path / "x.onnx"],
            "info": [exports["checkpoint"]],
            "loop": ["--model", exports["checkpoint"], "--state", tmp_path / "st", "--source", "stream",
                     "--frames", "10"],
            "demo": ["--quick", "--out", tmp_path / "demo"],
            "compare": [exports["checkpoint"], exports["adapted"], "--data", DATA]}[command]
    proc, blocked = cli(command, *args)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == (f"error: gprebn-edge {command} needs PyTorch, which this install lacks: "
                                   "pip install 'gprebn-edge[adapt]'")
    assert blocked and "Traceback" not in proc.stderr
    assert not any(tmp_path.glob("x.*")) and not (tmp_path / "st").exists()  # nothing written
