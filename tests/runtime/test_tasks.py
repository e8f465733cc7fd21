"""bench_model / compare_models on model files, and the `bench` and `compare` commands around them."""

import json

import pytest
from typer.testing import CliRunner

from gprebn_edge.cli import app
from gprebn_edge.errors import InputError
from gprebn_edge.runtime.tasks import RunnerOptions, bench_model, compare_models, parse_shape, parse_warmup

runner = CliRunner()
TEST = "synthetic:gaussian_noise:5:n=200:split=test"


@pytest.mark.parametrize("text, expected", [("10", (10, None)), ("0", (0, None)), ("2s", (1, 2.0)),
                                            ("0.5S", (1, 0.5))])
def test_parse_warmup(text, expected):
    assert parse_warmup(text) == expected


@pytest.mark.parametrize("text", ["", "x", "-1", "-2s", "1.5"])
def test_parse_warmup_rejects(text):
    with pytest.raises(InputError, match="--warmup"):
        parse_warmup(text)


def test_parse_shape():
    assert parse_shape("3,224,224") == (3, 224, 224)
    for bad in ("3,224", "a,b,c", "3,0,4"):
        with pytest.raises(InputError, match="C,H,W"):
            parse_shape(bad)


def test_bench_model_reports_each_batch_with_its_own_load(exported):
    results = bench_model(exported.onnx, RunnerOptions(threads=1), batches=(1, 4), iters=15)
    assert [r.batch for r in results] == [1, 4] and all(r.iterations == 15 for r in results)
    assert all(r.activate_ms is not None and r.first_call_cold for r in results)
    assert results[1].input_shape[0] == 4
    real = bench_model(exported.onnx, RunnerOptions(), batches=(2,), iters=5, data="synthetic:fog:5:n=16")[0]
    assert real.real_inputs


def test_compare_models_adapted_beats_unadapted(models):
    source, adapted, _ = models
    result = compare_models(source, adapted, TEST, latency_iters=10)
    assert result.images == 200 and result.b.error < result.a.error
    assert result.data["spec"] == TEST and result.latency["rounds"] == 10


def test_compare_refuses_models_with_different_preprocessing(models, tmp_path):
    import onnx

    source, adapted, _ = models
    proto = onnx.load(adapted)
    for p in proto.metadata_props:
        if p.key == "preprocess":
            p.value = json.dumps({**json.loads(p.value), "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]})
    onnx.save(proto, str(tmp_path / "other.onnx"))
    with pytest.raises(InputError, match="different preprocessing"):
        compare_models(source, tmp_path / "other.onnx", TEST)


def test_bench_command(exported, tmp_path):
    out, plot = tmp_path / "b.json", tmp_path / "b.png"
    r = runner.invoke(app, ["bench", str(exported.onnx), "--batch", "1,8", "--iters", "20", "--warmup", "3",
                            "--json", str(out), "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    payload = json.loads(out.read_text())
    assert [x["batch"] for x in payload["results"]] == [1, 8] and len(payload["results"][0]["latencies_ms"]) == 20
    assert plot.read_bytes()[:4] == b"\x89PNG" and "p99" in r.stdout and "environment:" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch"), (["--warmup", "x"], "--warmup"), (["--iters", "5", "--duration", "1"], "not both"),
    (["--json", "/no/such/dir/x.json"], "cannot write"), (["--backend", "nope"], "backend")])
def test_bench_command_errors(exported, args, message):
    r = runner.invoke(app, ["bench", str(exported.onnx), *args])
    assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bench_command_refuses_a_file_that_is_not_a_model(tmp_path):
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"not an onnx file")
    r = runner.invoke(app, ["bench", str(bogus)])
    assert r.exit_code == 1 and "not an ONNX model" in r.stderr and "Traceback" not in r.output


def test_compare_command(models, tmp_path):
    source, adapted, _ = models
    out, plot = tmp_path / "c.json", tmp_path / "c.png"
    r = runner.invoke(app, ["compare", source, adapted, "--data", TEST, "--latency-iters", "10", "--json", str(out),
                            "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["images"] == 200 and result["models"][1]["error"] < result["models"][0]["error"]
    assert "| top-1 error |" in r.stdout and "Latency" in r.stdout and plot.read_bytes()[:4] == b"\x89PNG"


def test_compare_command_refuses_mismatched_models(models, tmp_path):
    import warnings

    import torch
    from torch import nn

    path = tmp_path / "seven.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7)),
                          (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    r = runner.invoke(app, ["compare", models[1], str(path), "--data", TEST])
    assert r.exit_code == 1 and "class" in r.stderr and len(r.stderr.strip().splitlines()) == 1
