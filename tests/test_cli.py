"""The CLI through typer's CliRunner, and end to end on a user's own model and images."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from gprebn_edge.checkpoint import load_checkpoint, rebuild_model
from gprebn_edge.cli import app
from gprebn_edge.consent import TRUST_ALL

runner = CliRunner()

USER_MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=3):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(16, num_classes)

        def forward(self, x):
            return self.head(self.body(x))

    def make(num_classes=3):
        return Net(num_classes)

    def no_bn():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
""")


@pytest.fixture()
def user_project(tmp_path):
    """A model file, its weights (statistics far from the defaults) and a folder of labeled images of mixed
    sizes and modes, with one corrupt file."""
    (tmp_path / "net.py").write_text(USER_MODEL)
    torch.manual_seed(0)
    ns: dict = {}
    exec(USER_MODEL, ns)
    net = ns["make"]()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    for c, name in enumerate(["cat", "dog", "eel"]):
        (images / name).mkdir(parents=True)
        for i in range(12):
            size = (40 + 4 * (i % 3), 36)
            arr = (rng.random((size[1], size[0], 3)) * 80 + 60 * c).astype(np.uint8)
            im = Image.fromarray(arr)
            if i == 0:
                im = im.convert("L")
            elif i == 1:
                im = im.convert("RGBA")
            im.save(images / name / f"{i}.png")
    (images / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def test_adapt_user_model_file_with_weights_and_folder(user_project, tmp_path):
    out = tmp_path / "adapted.safetensors"
    result = runner.invoke(app, ["adapt", "--model", f"{user_project / 'net.py'}:make", "--weights",
                                 str(user_project / "w.pt"), "--data", str(user_project / "images"),
                                 "--resize", "32", "--crop", "32", "--mean", "0.5", "--std", "0.25",
                                 "--batch-size", "8", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 36 and summary["skipped"] == 1
    assert summary["online_error"] is not None  # class subfolders gave labels
    # a plain state dict of the user's architecture: loads with no gprebn-edge code
    ns: dict = {}
    exec(USER_MODEL, ns)
    net = ns["make"]()
    net.load_state_dict(load_file(str(out)))
    state, meta = load_checkpoint(out)
    assert meta["preprocess"] == {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert meta["method"]["method"] == "gprebn" and meta["method"]["batch_size"] == 8
    assert meta["calibration"]["fingerprint"].startswith("sha256:")
    assert meta["model"]["weights_sha256"].startswith("sha256:")
    assert len(meta["statistics_shift"]) == 2
    # the BN statistics moved away from the source ones, and the source model can be rebuilt
    source = torch.load(user_project / "w.pt")
    assert not torch.allclose(state["body.1.running_mean"], source["body.1.running_mean"])
    rebuilt, _ = rebuild_model(out, "source", consent=TRUST_ALL)  # the user's own net.py
    for k, v in source.items():
        assert torch.equal(rebuilt.state_dict()[k], v), k

    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "gprebn" in info.stdout and "online error" in info.stdout
    info_json = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    assert info_json["num_classes"] == 3 and info_json["model"]["spec"].endswith("net.py:make")


def test_adapt_builtin_synthetic_every_method(tmp_path):
    for method in ("source", "bn", "adabn", "tent", "gprebn"):
        out = tmp_path / f"{method}.safetensors"
        result = runner.invoke(app, ["adapt", "--model", "builtin:small_resnet", "--data",
                                     "synthetic:fog:5:n=96", "--method", method, "--batch-size", "32",
                                     "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "online error" in result.stdout
        _, meta = load_checkpoint(out)
        assert meta["method"]["method"] == method


@pytest.mark.parametrize("args,message", [
    (["--data", "synthetic:fog:5:n=8", "--model", "builtin:nope"], "builtin"),
    (["--data", "/no/such/folder", "--model", "builtin:small_resnet"], "/no/such/folder"),
    (["--data", "synthetic:fog:5:n=8", "--model", "builtin:small_resnet", "--method", "sar"], "unknown method"),
    (["--data", "synthetic:fog:5:n=8", "--model", "builtin:small_resnet", "--momentum", "fast"], "--momentum"),
    (["--data", "synthetic:fog:5:n=8", "--model", "builtin:small_resnet", "--mean", "a,b"], "--mean"),
    (["--data", "synthetic:fog:5:n=8", "--model", "builtin:small_resnet", "--batch-size", "0"], "--batch-size"),
    (["--data", "synthetic:fog:5:n=8", "--model", "builtin:small_resnet", "--crop", "64"], "--resize"),
])
def test_adapt_errors_are_one_line(tmp_path, args, message):
    out = tmp_path / "x.safetensors"
    result = runner.invoke(app, ["adapt", *args, "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_model_without_bn_and_wrong_weights(user_project, tmp_path):
    out = tmp_path / "x.safetensors"
    no_bn = runner.invoke(app, ["adapt", "--model", f"{user_project / 'net.py'}:no_bn", "--data",
                                str(user_project / "images"), "--resize", "32", "--crop", "32", "-o", str(out)])
    assert no_bn.exit_code == 1 and "no BatchNorm" in no_bn.stderr
    wrong = runner.invoke(app, ["adapt", "--model", "builtin:small_resnet", "--weights",
                                str(user_project / "w.pt"), "--data", "synthetic:fog:5:n=8", "-o", str(out)])
    assert wrong.exit_code == 1 and "do not match" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_output_must_be_safetensors_in_an_existing_folder(tmp_path):
    base = ["adapt", "--model", "builtin:small_resnet", "--data", "synthetic:fog:5:n=8"]
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "a.pt")])
    assert r.exit_code == 1 and ".safetensors" in r.stderr
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "missing" / "a.safetensors")])
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_info_rejects_non_artifacts(tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    r = runner.invoke(app, ["info", str(bogus)])
    assert r.exit_code == 1 and "not a safetensors checkpoint" in r.stderr
    r = runner.invoke(app, ["info", str(tmp_path / "none.safetensors")])
    assert r.exit_code == 1 and "no such checkpoint" in r.stderr


def test_help_works_for_every_command():
    for args in (["--help"], *([c, "--help"] for c in ("adapt", "info", "export", "bench", "compare", "loop",
                                                      "loop-report", "demo"))):
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and "Usage" in r.stdout


def test_demo_quick(tmp_path):
    """The whole chain on two shifts: adapt, export both ONNX files, compare, bench, plots, report."""
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--quick", "--out", str(out), "--shifts", "gaussian_noise,fog"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert [row["domain"] for row in report["rows"]] == ["gaussian_noise-5", "fog-5"]
    noisy = report["rows"][0]
    # adaptation must beat the unadapted model clearly on the noise corruption, even on 256 images
    assert noisy["adapted_error"] < 0.6 * noisy["source_error"]
    for row in report["rows"]:
        assert row["parity_top1"] == 1.0 and row["parity_max_rel"] <= 1e-5 and 0 < row["agreement"] < 1
        assert row["health"] == "ok"  # adaptations that help pass the health check cleanly
        assert 0 < row["latency_ratio"] < 10  # identical graphs; the quick run has too few rounds for a tight bound
        folder = out / row["domain"].removesuffix("-5")
        files = {p.name for p in folder.iterdir()}
        assert {"adapted.onnx", "unadapted.onnx", "adapted.safetensors", "compare.json", "compare.png"} <= files
    assert [b["batch"] for b in report["bench"]["rows"]] == [1, 32]
    assert report["tensorrt"]["status"] in ("skipped", "ran")
    for plot in report["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gaussian_noise-5" in r.stdout and "TensorRT" in r.stdout
    r = runner.invoke(app, ["demo", "--quick", "--out", str(out), "--shifts", "fog,nope"])
    assert r.exit_code == 1 and "nope" in r.stderr


def test_errors_print_user_text_verbatim(tmp_path):
    """No rich markup or emoji codes: '[vision]' and ':fog:' reach the user as written."""
    r = runner.invoke(app, ["adapt", "--model", "builtin:small_resnet", "--data", "synthetic:fog:9",
                            "-o", str(tmp_path / "a.safetensors")])
    assert r.exit_code == 1 and "synthetic:fog:9" in r.stderr
    r = runner.invoke(app, ["adapt", "--model", "torchvision:resnet18", "--data", "synthetic:fog:5:n=8",
                            "-o", str(tmp_path / "a.safetensors")])
    if r.exit_code == 1:  # torchvision missing here: the message names the extra to install
        assert "gprebn-edge[vision]" in r.stderr


def test_an_unrepresentative_calibration_set_is_flagged_everywhere(tmp_path):
    """One class only, without labels: adapt warns and records `suspect`; info, export and compare repeat it.
    With its labels, the held-back accuracy drop decides: refused, and nothing written."""
    from gprebn_edge.data.domains import load_domain

    images, labels = load_domain("clean", split="calib", n=800)
    labeled = tmp_path / "one_class_labeled.npz"
    np.savez(labeled, images=images[labels == 0], labels=labels[labels == 0])
    out = tmp_path / "a.safetensors"
    result = runner.invoke(app, ["adapt", "--model", "builtin:small_resnet", "--data", str(labeled), "-o", str(out)])
    assert result.exit_code == 1 and "held-back accuracy fell from" in result.stderr and not out.exists()
    data = tmp_path / "one_class.npz"
    np.savez(data, images=images[labels == 0])
    result = runner.invoke(app, ["adapt", "--model", "builtin:small_resnet", "--data", str(data), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "likely worse" in result.stderr and "--theta" in result.stderr
    assert "health verdict" in result.stdout and "suspect" in result.stdout
    meta = load_checkpoint(out)[1]
    assert meta["summary"]["health"]["verdict"] == "suspect"
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "adaptation health suspect" in info.stdout
    exported = runner.invoke(app, ["export", str(out), "--check-images", "64"])
    assert exported.exit_code == 0, exported.output
    assert "adaptation health suspect" in exported.stderr
    source = runner.invoke(app, ["export", str(out), "--unadapted", "--check-images", "64"])
    assert source.exit_code == 0 and "adaptation health" not in source.output
    compared = runner.invoke(app, ["compare", str(tmp_path / "a-unadapted.onnx"), str(tmp_path / "a.onnx"),
                                   "--data", "synthetic:clean:n=64", "--latency-iters", "0"])
    assert compared.exit_code == 0, compared.output
    assert "Warning: a.onnx: adaptation health suspect" in compared.stdout
    assert "a-unadapted.onnx: adaptation" not in compared.stdout
