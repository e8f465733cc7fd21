"""One --json convention for every command that has it: `--json PATH` writes the JSON atomically to PATH
beside the human output; `--json -` prints only the JSON on stdout (notes and warnings go to stderr), and a
bare `--json` (the older flag of adapt, info and export) means `--json -`."""

import json

import pytest
from typer.testing import CliRunner

from gprebn_edge.cli import app

runner = CliRunner()
ADAPT = ["adapt", "--model", "builtin:small_resnet", "--data", "synthetic:fog:5:n=32", "--batch-size", "16"]


def commands(made, tmp_path):
    """Each command with --json: (arguments before --json, a key its JSON has, a line its human output has)."""
    return {
        "adapt": ([*ADAPT, "-o", str(tmp_path / "a.safetensors")], "steps", "online error"),
        "info": (["info", str(made.checkpoint)], "num_classes", "online error"),
        "info-onnx": (["info", str(made.onnx)], "metadata", "adaptation health"),
        "export": (["export", str(made.checkpoint), "--onnx", str(tmp_path / "e.onnx"), "--check-images", "16"],
                   "parity", "parity vs PyTorch"),
        "bench": (["bench", str(made.onnx), "--iters", "3", "--warmup", "1", "--threads", "1"], "results",
                  "environment:"),
        "compare": (["compare", str(made.onnx), str(made.onnx), "--data", "synthetic:fog:5:n=16",
                     "--latency-iters", "2", "--threads", "1"], "agreement", "Agreement"),
        "loop-report": (["loop-report", str(made.log)], "frames", "Online accuracy per segment"),
    }


NAMES = ["adapt", "info", "info-onnx", "export", "bench", "compare", "loop-report"]


@pytest.mark.parametrize("name", NAMES)
def test_json_dash_prints_only_json_on_stdout(made, tmp_path, name):
    args, key, human = commands(made, tmp_path)[name]
    r = runner.invoke(app, [*args, "--json", "-"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)  # nothing but the JSON: a script can pipe it
    assert key in payload
    assert human not in r.stdout and not (tmp_path / "-").exists()


@pytest.mark.parametrize("name", NAMES)
def test_json_path_writes_the_file_beside_the_human_output(made, tmp_path, name):
    args, key, human = commands(made, tmp_path)[name]
    out = tmp_path / "out.json"
    r = runner.invoke(app, [*args, "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert key in json.loads(out.read_text())
    assert human in r.stdout and f"json: {out}" in r.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.json")]  # no temporary left


@pytest.mark.parametrize("name", ["adapt", "info", "export"])
def test_bare_json_last_or_before_an_option_still_means_stdout(made, tmp_path, name):
    args, key, _ = commands(made, tmp_path)[name]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert key in json.loads(r.stdout)
    if name == "export":  # followed by another option: still the flag, not a file named --trust-model-code
        r = runner.invoke(app, [*args, "--json", "--trust-model-code"])
        assert r.exit_code == 0, r.output
        assert key in json.loads(r.stdout)


@pytest.mark.parametrize("name", NAMES)
def test_json_path_in_a_missing_folder_fails_before_any_work(made, tmp_path, name):
    args, _, _ = commands(made, tmp_path)[name]
    r = runner.invoke(app, [*args, "--json", str(tmp_path / "missing" / "x.json")])
    assert r.exit_code == 1, r.output
    assert "cannot write" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "e.onnx").exists()


def test_plot_note_goes_to_stderr_with_json_dash(made, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "loop.png"
    r = runner.invoke(app, ["loop-report", str(made.log), "--plot", str(plot), "--json", "-"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["frames"] == 200
    assert f"plot: {plot}" in r.stderr and plot.is_file()


def test_every_json_option_shows_path_or_dash():
    for name in ("adapt", "info", "export", "bench", "compare", "loop-report"):
        r = runner.invoke(app, [name, "--help"])
        assert r.exit_code == 0 and "PATH|-" in r.stdout, name
