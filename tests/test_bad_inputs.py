"""Every bad input of tests/bad_inputs/ (made by make_corpus.py), and a few made here (unreadable files, a full
disk, Ctrl-C), through the commands that read it. Each ends in one clear line on stderr and a non-zero exit code,
or, where skipping or converting is right, in success with the skip counted; never a traceback, never an output
file or a leftover temporary file after a failure."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
from safetensors import SafetensorError
from typer.testing import CliRunner

from gprebn_edge.cli import app

CORPUS = Path(__file__).parent / "bad_inputs"
_spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
assert _spec is not None and _spec.loader is not None
make_corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_corpus)
ENTRIES: dict[str, str] = make_corpus.ENTRIES

runner = CliRunner()
NET = f"{CORPUS / 'models' / 'net.py'}:make"
SMALL = "synthetic:fog:5:n=16"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# The commands this file covers; test_every_command_has_cases fails for a new command without cases here.
COMMANDS = ("adapt", "info", "export", "bench", "compare", "loop", "loop-report")

USED: set[str] = set()  # corpus entries some case below uses (test_every_entry_is_used)


def c(entry: str) -> str:
    """The path of a corpus entry (or of a folder of entries), recorded as used."""
    assert (CORPUS / entry).exists(), entry
    USED.add(entry)
    return str(CORPUS / entry)


# -- helpers ------------------------------------------------------------------------------------------------------
def invoke(*args: object):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    return r


def assert_fails(r, *words: str, code: int = 1, out: Path | None = None) -> None:
    """Exit `code`, exactly one line on stderr naming every word, and nothing left in `out`."""
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    if out is not None:
        assert sorted(p.name for p in out.iterdir()) == [], "partial output left behind"


@pytest.fixture()
def out(tmp_path) -> Path:
    """An empty output folder; a failed command must leave it empty."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture(autouse=True)
def payload_marker(tmp_path, monkeypatch):
    """The pickled payloads of the corpus touch this file if anything ever unpickles them."""
    marker = tmp_path / "UNPICKLED"
    monkeypatch.setenv(make_corpus.PAYLOAD_ENV, str(marker))
    yield marker
    assert not marker.exists(), "a pickled payload was unpickled"


CASE_TIMEOUT_S = 300  # every case; a hang fails the case instead of stalling the run


class Hang(Exception):
    """Raised by the alarm of hang_guard."""


@pytest.fixture(autouse=True)
def hang_guard():
    """Fail a case that runs longer than CASE_TIMEOUT_S (SIGALRM interrupts the main thread, where the CLI runs)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(signum, frame):
        raise Hang(f"the case ran for more than {CASE_TIMEOUT_S} s: a hang")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """One small adapted artifact of the built-in model and its ONNX export, shared by the cases below."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    artifact = folder / "adapted.safetensors"
    r = invoke("adapt", "--model", "builtin:small_resnet", "--data", "synthetic:fog:5:n=64", "--batch-size", "32",
               "-o", artifact)
    assert r.exit_code == 0, r.output
    r = invoke("export", artifact, "--check-images", "64")
    assert r.exit_code == 0, r.output
    return {"artifact": artifact, "onnx": artifact.with_suffix(".onnx")}


def adapt_args(data: str, output: Path, *extra: object) -> list[object]:
    return ["adapt", "--model", "builtin:small_resnet", "--data", data, "--batch-size", "8", "-o", output, *extra]


# -- the corpus itself --------------------------------------------------------------------------------------------
def test_corpus_is_complete_small_and_reproducible(tmp_path):
    assert len(ENTRIES) >= 30
    assert all((CORPUS / e).exists() for e in ENTRIES)
    files = make_corpus.build()
    assert sum(len(v) for v in files.values()) < 300_000
    for rel, data in files.items():  # the committed files are what make_corpus.py makes
        assert (CORPUS / rel).read_bytes() == data, f"{rel} differs: rerun tests/bad_inputs/make_corpus.py"


def test_the_payload_check_has_teeth(payload_marker):
    """Unpickling a corpus payload does touch the marker, so its absence after the cases means something."""
    data = (CORPUS / "weights" / "pickled_object.pkl").read_bytes()
    pickle.loads(data)  # noqa: S301 - the point of this test
    assert payload_marker.exists()
    payload_marker.unlink()


# -- data: adapt ------------------------------------------------------------------------------------------------
DATA_FAILS = [
    ("images", "could not be read"),                        # 7 bad images and a 1x1 one: over the skip limit
    ("folders/empty", "no images found"),
    ("folders/all_corrupt", "none of the 4 images"),
    ("folders/too_many_corrupt", "4 of 10 images could not be read"),
    ("folders/mixed_sizes", "differ in size"),
    ("folders/mixed_layout", "mix of class folders and loose images"),
    ("arrays/nan.npy", "NaN or Inf"),
    ("arrays/inf.npy", "NaN or Inf"),
    ("arrays/object.npy", "Python objects"),
    ("arrays/object_in.npz", "Python objects"),
    ("arrays/wrong_rank.npy", "2 dimensions"),
    ("arrays/five_d.npy", "5 dimensions"),
    ("arrays/one_image.npy", "one HxWxC image"),
    ("arrays/five_channels.npy", "1 or 3 channels"),
    ("arrays/float_0_255.npy", "scale them to [0, 1]"),
    ("arrays/empty.npy", "no images"),
    ("arrays/complex.npy", "dtype complex64"),
    ("arrays/truncated.npy", "truncated or corrupt"),
    ("arrays/no_images.npz", "'images'"),
    ("arrays/labels_mismatch.npz", "4 images but 3 labels"),
    ("arrays/negative_labels.npz", "non-negative"),
    ("arrays/not_zip.npz", "is not a zip archive"),
    ("arrays/random_bytes.npy", "is not a .npy array file"),
    ("arrays/bad_header.npy", "header is malformed"),
    ("arrays/huge_declared.npz", "PiB of memory"),
    ("arrays/huge_declared.npy", "truncated or corrupt"),
]


@pytest.mark.parametrize("entry, words", DATA_FAILS, ids=[e for e, _ in DATA_FAILS])
def test_adapt_refuses_bad_data(entry, words, out):
    r = invoke(*adapt_args(c(entry), out / "a.safetensors"))
    assert_fails(r, words, out=out)


def test_adapt_refuses_missing_data(out):
    assert_fails(invoke(*adapt_args("no/such/folder", out / "a.safetensors")), "no such file", out=out)


BAD_IMAGES = [("images/truncated.jpg", "Truncated"), ("images/truncated.png", "truncated"),
              ("images/random_bytes.png", "not a recognised image"), ("images/zero_bytes.jpg", "0 bytes"),
              ("images/text.jpg", "not a recognised image"), ("images/bad_crc.png", "OSError"),
              ("images/bomb.png", "DecompressionBomb")]


def _good_folder(root: Path, n: int = 20) -> Path:
    root.mkdir()
    for good in sorted((CORPUS / "folders" / "some_corrupt").glob("good_*.png"))[:n]:
        shutil.copy(good, root / good.name)
    return root


@pytest.mark.parametrize("entry, reason", BAD_IMAGES, ids=[e for e, _ in BAD_IMAGES])
def test_each_bad_image_is_a_counted_skip(entry, reason, tmp_path, out):
    """Among 20 good images one bad image is skipped, counted and named in the artifact; alone, it is an error."""
    data = _good_folder(tmp_path / "data")
    shutil.copy(c(entry), data / Path(entry).name)
    r = invoke(*adapt_args(str(data), out / "a.safetensors", "--json"))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["images"] == 20 and summary["skipped"] == 1
    meta = json.loads(invoke("info", out / "a.safetensors", "--json").stdout)
    [(name, why)] = meta["calibration"]["skipped_items"]
    assert name == Path(entry).name and reason.lower() in why.lower()

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(c(entry), alone)
    (out / "a.safetensors").unlink()
    assert_fails(invoke(*adapt_args(str(alone), out / "a.safetensors")), "none of the 1 images", out=out)


def test_some_corrupt_images_are_a_counted_skip(out):
    r = invoke(*adapt_args(c("folders/some_corrupt"), out / "a.safetensors", "--json"))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["images"] == 20 and summary["skipped"] == 2
    r = invoke(*adapt_args(c("folders/some_corrupt"), out / "b.safetensors"))
    assert r.exit_code == 0 and "(2 unreadable, skipped)" in r.stdout


def test_every_image_mode_is_converted(out):
    """Grayscale, gray+alpha, RGBA, 1-bit, palette (with transparency), 16-bit gray and RGB, float and CMYK."""
    r = invoke(*adapt_args(c("folders/modes"), out / "a.safetensors", "--json"))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["images"] == 10 and summary["skipped"] == 0


def test_wrong_sizes_are_resized_when_asked(out, tmp_path):
    """A 1x1 and a 64x48 image among 32x32 ones: one clear error without --resize/--crop (DATA_FAILS), every
    image brought to 32x32 with them. A 1x1 image alone is smaller than --crop without --resize."""
    c("images/tiny_1x1.png")
    r = invoke(*adapt_args(c("folders/mixed_sizes"), out / "a.safetensors", "--resize", "32", "--crop", "32",
                           "--json"))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == 6
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    shutil.copy(CORPUS / "images" / "tiny_1x1.png", tiny)
    assert_fails(invoke(*adapt_args(str(tiny), out / "b.safetensors", "--crop", "32")), "smaller than --crop",
                 "pass --resize")


# -- data: the other commands read it through the same sources ---------------------------------------------------
def test_bad_data_in_export_bench_and_compare(built, out):
    onnx = built["onnx"]
    assert_fails(invoke("export", built["artifact"], "--onnx", out / "x.onnx", "--data", c("folders/empty")),
                 "no images found", out=out)
    assert_fails(invoke("export", built["artifact"], "--onnx", out / "x.onnx", "--data", c("arrays/nan.npy")),
                 "NaN or Inf", out=out)
    assert_fails(invoke("export", built["artifact"], "--onnx", out / "x.onnx", "--data",
                        c("folders/too_many_corrupt")), "could not be read", out=out)
    assert_fails(invoke("bench", onnx, "--data", c("arrays/inf.npy"), "--json", out / "b.json"), "NaN or Inf",
                 out=out)
    assert_fails(invoke("bench", onnx, "--data", c("folders/all_corrupt"), "--json", out / "b.json"),
                 "could be read", out=out)
    assert_fails(invoke("compare", onnx, onnx, "--data", c("folders/mixed_sizes"), "--json", out / "c.json"),
                 "differ in size", out=out)
    assert_fails(invoke("compare", onnx, onnx, "--data", c("arrays/object.npy"), "--json", out / "c.json"),
                 "Python objects", out=out)


def test_compare_counts_skipped_images(built, out):
    r = invoke("compare", built["onnx"], built["onnx"], "--data", c("folders/some_corrupt"), "--latency-iters", "0",
               "--json", out / "c.json")
    assert r.exit_code == 0, r.output
    data = json.loads((out / "c.json").read_text())["data"]
    assert data["skipped"] == 2 and "of 20 images" in r.stdout


# -- models and weights: adapt -----------------------------------------------------------------------------------
MODEL_FAILS = [
    ("models/no_bn.py", "no BatchNorm layers"),
    ("models/no_running_stats.py", "no running statistics"),
    ("models/syntax_error.py", "SyntaxError: 'break' outside loop"),
    ("models/raises.py", "raised RuntimeError: the factory cannot find its config file"),
    ("models/not_module.py", "returned dict, not a torch.nn.Module"),
    ("models/bad_output.py", "(N, classes) logits"),
]


@pytest.mark.parametrize("entry, words", MODEL_FAILS, ids=[e for e, _ in MODEL_FAILS])
def test_adapt_refuses_bad_models(entry, words, out):
    r = invoke("adapt", "--model", f"{c(entry)}:make", "--data", SMALL, "-o", out / "a.safetensors")
    assert_fails(r, words, out=out)


@pytest.mark.parametrize("spec, words", [("missing.py:make", "does not exist"), ("net.py:nope", "no callable 'nope'"),
                                         ("net.py", "no ':'")])
def test_adapt_refuses_bad_model_specs(spec, words, out):
    r = invoke("adapt", "--model", str(CORPUS / "models" / spec), "--data", SMALL, "-o", out / "a.safetensors")
    assert_fails(r, words, out=out)


WEIGHT_FAILS = [
    ("weights/pickled_object.pt", "pickled Python objects"),
    ("weights/pickled_object.pkl", "pickled Python objects"),
    ("weights/other_model.pt", "do not match"),
    ("weights/wrong_shapes.safetensors", "shape mismatch"),
    ("weights/random_bytes.pt", "not a readable weights file"),
    ("weights/zero_bytes.safetensors", "not a readable safetensors file"),
    ("weights/truncated.safetensors", "not a readable safetensors file"),
    ("weights/non_tensor_values.pt", "not a plain state dict"),
    ("weights/empty_state_dict.pt", "empty state dict"),
    ("weights/nan.safetensors", "the weights of"),
]


@pytest.mark.parametrize("entry, words", WEIGHT_FAILS, ids=[e for e, _ in WEIGHT_FAILS])
def test_adapt_refuses_bad_weights(entry, words, out):
    r = invoke("adapt", "--model", NET, "--weights", c(entry), "--data", SMALL, "-o", out / "a.safetensors")
    assert_fails(r, words, out=out)


def test_weights_of_another_model_for_the_builtin(out):
    r = invoke(*adapt_args(SMALL, out / "a.safetensors", "--weights", c("weights/other_model.pt")))
    assert_fails(r, "do not match builtin:small_resnet", "missing", "unexpected", out=out)


def test_untraceable_model_adapts_and_exports(out):
    """Not an error: torch.fx cannot trace it, so its BatchNorm is folded in the ONNX graph instead."""
    artifact = out / "u.safetensors"
    r = invoke("adapt", "--model", f"{c('models/untraceable.py')}:make", "--data", SMALL, "-o", artifact)
    assert r.exit_code == 0, r.output
    r = invoke("export", artifact, "--json", "--trust-model-code")
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout)
    assert manifest["fold"]["where"].startswith("onnx") and manifest["parity"]["top1_agreement"] == 1.0


def test_artifact_whose_model_file_changed(out, tmp_path):
    """An artifact outlives its model file: the factory now builds another architecture, or is gone."""
    net = tmp_path / "net.py"
    shutil.copy(CORPUS / "models" / "net.py", net)
    artifact = tmp_path / "a.safetensors"
    assert invoke("adapt", "--model", f"{net}:make", "--data", SMALL, "-o", artifact).exit_code == 0
    net.write_text(net.read_text().replace("nn.Conv2d(3, 8, 3", "nn.Conv2d(3, 8, 5"))
    assert_fails(invoke("export", artifact, "--onnx", out / "x.onnx", "--model", f"{net}:make"), "do not match",
                 "shape mismatch", out=out)
    net.unlink()
    assert_fails(invoke("export", artifact, "--onnx", out / "x.onnx", "--trust-model-code"), "does not exist", out=out)
    assert_fails(invoke("bench", artifact, "--iters", "2", "--json", out / "b.json", "--trust-model-code"),
                 "does not exist", out=out)


# -- artifacts: info, export, bench, compare ---------------------------------------------------------------------
ARTIFACT_FAILS = [
    ("artifacts/plain.safetensors", "not a gprebn-edge checkpoint"),
    ("artifacts/random_bytes.safetensors", "not a safetensors checkpoint"),
    ("artifacts/bad_json.safetensors", "not valid JSON"),
    ("artifacts/meta_not_object.safetensors", "not an object"),
    ("artifacts/wrong_format.safetensors", "unknown artifact format"),
    ("artifacts/future_version.safetensors", "newer gprebn-edge"),
    ("artifacts/missing_fields.safetensors", {"info": "metadata lacks", None: "model spec metadata"}),
    ("artifacts/preprocess_string.safetensors", "metadata field 'preprocess' is a string"),
    ("artifacts/mean_wrong.safetensors", "metadata field 'preprocess.mean' has 2 values"),
    ("artifacts/mean_nan.safetensors", "'preprocess.mean[0]' is the number nan"),
    ("artifacts/summary_list.safetensors", "metadata field 'summary' is a list"),
    ("artifacts/calibration_number.safetensors", "metadata field 'calibration' is the number 5"),
    ("artifacts/num_classes_string.safetensors", "metadata field 'num_classes' is a string"),
    ("artifacts/source_bn_garbage.safetensors", "'source_bn.bn1.running_mean.data' is not base64"),
    ("artifacts/source_bn_huge.safetensors", "PiB of memory"),
    # an ONNX file given as an artifact (compare reads a model's metadata by its suffix, whatever --backend says)
    ("onnx/random_bytes.onnx", {"compare": "is not an ONNX model", None: "expected an adapted checkpoint"}),
]


def _artifact_command(command: str, path: str, out: Path, onnx: Path) -> list[object]:
    return {"info": ["info", path],
            "export": ["export", path, "--onnx", out / "x.onnx"],
            "bench": ["bench", path, "--backend", "torch", "--iters", "2", "--json", out / "b.json"],
            "compare": ["compare", path, onnx, "--data", SMALL, "--backend-a", "torch", "--json", out / "c.json"],
            }[command]


@pytest.mark.parametrize("command", ["info", "export", "bench", "compare"])
@pytest.mark.parametrize("entry, words", ARTIFACT_FAILS, ids=[e for e, _ in ARTIFACT_FAILS])
def test_bad_artifacts(entry, words, command, built, out):
    r = invoke(*_artifact_command(command, c(entry), out, built["onnx"]))
    assert_fails(r, words.get(command, words[None]) if isinstance(words, dict) else words, out=out)


def _with_metadata(artifact: Path, dest: Path, change) -> Path:
    """A copy of `artifact` whose gprebn-edge metadata `change` edited in place."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(artifact), "pt") as f:
        raw = f.metadata()
    meta = json.loads(raw["gprebn_edge"])
    change(meta)
    save_file(load_file(str(artifact)), str(dest), metadata={**raw, "gprebn_edge": json.dumps(meta)})
    return dest


@pytest.mark.parametrize("value, words", [("ten", "a string ('ten')"), (-3, "is -3"), (10.5, "10.5")])
def test_export_of_a_model_spec_whose_num_classes_is_not_a_count(value, words, built, out, tmp_path):
    bad = _with_metadata(built["artifact"], tmp_path / "bad.safetensors",
                         lambda m: m["model"].__setitem__("num_classes", value))
    assert_fails(invoke("export", bad, "--onnx", out / "x.onnx"), "'model.num_classes'", words, out=out)


def test_bench_of_a_model_whose_weights_are_all_nan(built, out, tmp_path):
    """The latency of a broken model is not a result."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(built["artifact"]), "pt") as f:
        raw = f.metadata()
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
           for k, v in load_file(str(built["artifact"])).items()}
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata=raw)
    r = invoke("bench", tmp_path / "nan.safetensors", "--backend", "torch", "--input-shape", "3,32,32", "--iters", "2",
               "--json", out / "b.json")
    assert_fails(r, "outputs are not finite", out=out)


@pytest.mark.parametrize("size", [40_000, 1_000_000])
def test_bench_of_an_onnx_file_with_a_huge_input(size, out, tmp_path):
    """Refused before anything is allocated, naming the size (a MemoryError before)."""
    path = tmp_path / f"huge{size}.onnx"
    path.write_bytes(make_corpus._onnx_classifier(10, size, make_corpus._BUILTIN_PREPROCESS))
    r = invoke("bench", path, "--iters", "2", "--json", out / "b.json")
    assert_fails(r, f"[1, 3, {size}, {size}]", "lower --batch", out=out)


@pytest.mark.parametrize("flags, shape", [(["--input-shape", "3,100000,100000"], "[1, 3, 100000, 100000]"),
                                          (["--batch", "100000000"], "[100000000, 3, 32, 32]")])
def test_bench_of_a_batch_too_large_for_memory(flags, shape, built, out):
    r = invoke("bench", built["onnx"], *flags, "--iters", "2", "--json", out / "b.json")
    assert_fails(r, shape, "GiB", out=out)


@pytest.mark.parametrize("command", ["info", "export", "bench", "compare"])
def test_truncated_and_missing_artifacts(command, built, out, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = built["artifact"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert_fails(invoke(*_artifact_command(command, str(cut), out, built["onnx"])), "not a safetensors checkpoint",
                 out=out)
    missing = str(tmp_path / "none.safetensors")
    assert_fails(invoke(*_artifact_command(command, missing, out, built["onnx"])), "none.safetensors", out=out)


# -- ONNX files and engines: bench, compare ----------------------------------------------------------------------
MODEL_FILE_FAILS = [
    ("onnx/random_bytes.onnx", "not an ONNX model", "not an ONNX model"),
    ("onnx/truncated.onnx", "not an ONNX model", "not an ONNX model"),
    ("onnx/zero_bytes.onnx", "cannot load", "cannot load"),
    ("onnx/two_inputs.onnx", "one image batch in", "one image batch in"),
    ("onnx/other_classes.onnx", None, "10 vs 5 classes"),
    ("onnx/other_input.onnx", None, "different inputs"),
    ("onnx/other_preprocess.onnx", None, "different preprocessing"),
    ("engines/foreign.engine", "gprebn-edge[trt]", "gprebn-edge[trt]"),
    ("misc/model.bin", "cannot tell how to run", "cannot tell how to run"),
    ("onnx/external_outside.onnx", "outside the model's folder", "outside the model's folder"),
    ("onnx/external_missing.onnx", "which does not exist", "which does not exist"),
    ("onnx/preprocess_list.onnx", None, "metadata field 'preprocess' is a list"),
]


@pytest.mark.parametrize("entry, bench_words, compare_words", MODEL_FILE_FAILS, ids=[e for e, *_ in MODEL_FILE_FAILS])
def test_bad_model_files(entry, bench_words, compare_words, built, out):
    """bench takes any valid model (None: it succeeds); compare also refuses two models that do not match."""
    r = invoke("bench", c(entry), "--iters", "3", "--warmup", "1", "--json", out / "b.json")
    if bench_words is None:
        assert r.exit_code == 0 and (out / "b.json").is_file(), r.output
        (out / "b.json").unlink()
    else:
        assert_fails(r, bench_words, out=out)
    r = invoke("compare", built["onnx"], c(entry), "--data", SMALL, "--latency-iters", "2", "--json", out / "c.json")
    assert_fails(r, compare_words, out=out)


# -- unreadable files (real permissions need a non-root user; the simulated cases run everywhere) -----------------
needs_non_root = pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions (chmod 000 reads fine)")


@needs_non_root
def test_unreadable_files(built, tmp_path, out):
    data = _good_folder(tmp_path / "data")
    (data / "locked.png").write_bytes((data / "good_00.png").read_bytes())
    (data / "locked.png").chmod(0)
    weights = tmp_path / "w.pt"
    shutil.copy(CORPUS / "weights" / "other_model.pt", weights)
    weights.chmod(0)
    artifact = tmp_path / "locked.safetensors"
    shutil.copy(built["artifact"], artifact)
    artifact.chmod(0)
    try:
        r = invoke(*adapt_args(str(data), out / "a.safetensors", "--json"))
        assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 1, r.output
        (out / "a.safetensors").unlink()
        assert_fails(invoke("adapt", "--model", NET, "--weights", weights, "--data", SMALL, "-o",
                            out / "a.safetensors"), "w.pt", out=out)
        assert_fails(invoke("info", artifact), "locked.safetensors")
        assert_fails(invoke("export", artifact, "--onnx", out / "x.onnx"), "locked.safetensors", out=out)
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
        assert_fails(invoke("export", built["artifact"], "--onnx", readonly / "x.onnx"), "Permission denied")
        assert list(readonly.iterdir()) == []
    finally:
        for p in (data / "locked.png", weights, artifact):
            p.chmod(0o644)


def test_unreadable_image_simulated(tmp_path, out, monkeypatch):
    data = _good_folder(tmp_path / "data")
    shutil.copy(data / "good_00.png", data / "locked.png")
    read_bytes = Path.read_bytes

    def locked(self: Path) -> bytes:
        if self.name == "locked.png":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", locked)
    r = invoke(*adapt_args(str(data), out / "a.safetensors", "--json"))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["skipped"] == 1


def test_unwritable_output_folder_simulated(built, out, monkeypatch):
    import gprebn_edge.io

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(gprebn_edge.io.tempfile, "mkstemp", denied)
    assert_fails(invoke("export", built["artifact"], "--onnx", out / "x.onnx"), "cannot write", "Permission denied",
                 out=out)
    assert_fails(invoke(*adapt_args(SMALL, out / "a.safetensors")), "cannot write", "Permission denied", out=out)


# -- a disk that fills up ----------------------------------------------------------------------------------------
def _half_then(exc: BaseException):
    """A writer that writes half a file to its target path and then fails, as a full disk does."""

    def write(_obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 4096)
        raise exc

    return write


def _fsync_fails_at(n: int):
    """os.fsync that reports ENOSPC (delayed allocation: the disk filled up after write() returned) on call n."""
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(errno.ENOSPC, "No space left on device")

    return fsync


def test_disk_full_while_writing_the_checkpoint(out, monkeypatch):
    import gprebn_edge.checkpoint

    error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(gprebn_edge.checkpoint, "save_file", _half_then(error))
    assert_fails(invoke(*adapt_args(SMALL, out / "a.safetensors")), "cannot write", "No space left", out=out)


def test_disk_full_while_writing_the_onnx_file(built, out, monkeypatch):
    import onnx

    monkeypatch.setattr(onnx, "save", _half_then(OSError(errno.ENOSPC, "No space left on device")))
    assert_fails(invoke("export", built["artifact"], "--onnx", out / "x.onnx"), "cannot write", "No space left",
                 out=out)


@pytest.mark.parametrize("command", ["adapt", "export", "bench", "compare"])
def test_disk_full_at_fsync(command, built, out, monkeypatch):
    monkeypatch.setattr(os, "fsync", _fsync_fails_at(1))
    args = {"adapt": adapt_args(SMALL, out / "a.safetensors"),
            "export": ["export", built["artifact"], "--onnx", out / "x.onnx"],
            "bench": ["bench", built["onnx"], "--iters", "3", "--json", out / "b.json"],
            "compare": ["compare", built["onnx"], built["onnx"], "--data", SMALL, "--latency-iters", "2",
                        "--json", out / "c.json"]}[command]
    assert_fails(invoke(*args), "cannot write", "No space left", out=out)


def test_disk_full_while_writing_the_export_manifest(built, out, monkeypatch):
    monkeypatch.setattr(os, "fsync", _fsync_fails_at(2))  # the ONNX file is written, then its manifest fails
    r = invoke("export", built["artifact"], "--onnx", out / "x.onnx")
    assert_fails(r, "cannot write", "x.manifest.json")
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert not (out / "x.onnx").exists(), "the ONNX file was left without its manifest"


# -- Ctrl-C during each command ----------------------------------------------------------------------------------
def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _interrupt_after(n: int, real):
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapped


def _ctrl_c_cases(built: dict[str, Path], out: Path) -> dict[str, tuple[str, str, object, list[object]]]:
    """command -> (module, attribute to patch, replacement, arguments): the patch fires in the middle of the work."""
    from gprebn_edge.methods.base import Adapter
    from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner

    return {
        "adapt": ("gprebn_edge.methods.base", "Adapter.step", _interrupt_after(1, Adapter.step),
                  adapt_args(SMALL, out / "a.safetensors")),
        "adapt-while-saving": ("gprebn_edge.checkpoint", "save_file", _half_then(KeyboardInterrupt()),
                               adapt_args(SMALL, out / "a.safetensors")),
        "export": ("gprebn_edge.export.onnx_export", "onnx_parity", _interrupt,
                   ["export", built["artifact"], "--onnx", out / "x.onnx"]),
        "bench": ("gprebn_edge.runtime.ort_runner", "OnnxRuntimeRunner._infer",
                  _interrupt_after(5, OnnxRuntimeRunner._infer),
                  ["bench", built["onnx"], "--iters", "50", "--json", out / "b.json"]),
        "compare": ("gprebn_edge.runtime.ort_runner", "OnnxRuntimeRunner._infer",
                    _interrupt_after(3, OnnxRuntimeRunner._infer),
                    ["compare", built["onnx"], built["onnx"], "--data", SMALL, "--json", out / "c.json"]),
        "info": ("gprebn_edge.checkpoint", "load_file", _interrupt, ["info", built["artifact"]]),
        "loop-report": ("gprebn_edge.device.report", "read_log", _interrupt,
                        ["loop-report", c("logs/empty.jsonl"), "--json", out / "r.json"]),
    }


@pytest.mark.parametrize("case", ["adapt", "adapt-while-saving", "export", "bench", "compare", "info", "loop-report"])
def test_ctrl_c(case, built, out, monkeypatch):
    import importlib

    module, attribute, replacement, args = _ctrl_c_cases(built, out)[case]
    target = importlib.import_module(module)
    owner, _, name = attribute.rpartition(".")
    monkeypatch.setattr(getattr(target, owner) if owner else target, name, replacement)
    r = invoke(*args)
    assert_fails(r, "interrupted", code=130, out=out)


# -- the device loop ---------------------------------------------------------------------------------------------
def loop_args(state: Path, *args: object, source: str = SMALL) -> list[object]:
    return ["loop", "--source", source, "--state", state, "--frames", "16", *args]


LOOP_SOURCE_FAILS = [("folders/empty", "no images found"), ("folders/all_corrupt", "none of the 4 images"),
                     ("arrays/nan.npy", "NaN or Inf"), ("folders/mixed_sizes", "differ in size")]


@pytest.mark.parametrize("entry, words", LOOP_SOURCE_FAILS, ids=[e for e, _ in LOOP_SOURCE_FAILS])
def test_loop_refuses_bad_sources(entry, words, built, out):
    r = invoke(*loop_args(out, "--onnx", built["onnx"], source=c(entry)))
    assert_fails(r, words)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_loop_serves_converted_images(built, out):
    r = invoke(*loop_args(out, "--onnx", built["onnx"], "--frames", "100", source=c("folders/modes")))
    assert r.exit_code == 0 and "10 frames (source exhausted)" in r.stdout, r.output


def test_loop_skips_corrupt_frames(built, out):
    r = invoke(*loop_args(out, "--onnx", built["onnx"], "--frames", "100", source=c("folders/some_corrupt")))
    assert r.exit_code == 0 and "20 frames (source exhausted, 2 unreadable skipped)" in r.stdout, r.output
    stop = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert stop["event"] == "stop" and stop["skipped"] == 2


LOOP_MODEL_FAILS = [("--model", "artifacts/plain.safetensors", "not a gprebn-edge checkpoint"),
                    ("--model", "artifacts/meta_not_object.safetensors", "not an object"),
                    ("--onnx", "onnx/random_bytes.onnx", "not an ONNX model"),
                    ("--onnx", "onnx/other_input.onnx", "preprocess the images to")]


@pytest.mark.parametrize("flag, entry, words", LOOP_MODEL_FAILS, ids=[e for _, e, _ in LOOP_MODEL_FAILS])
def test_loop_refuses_bad_models(flag, entry, words, out):
    state = out / "state"
    assert_fails(invoke(*loop_args(state, flag, c(entry))), words)
    left = sorted(p.name for p in state.iterdir()) if state.exists() else []
    assert left == [], f"a refused {flag} was left in the state folder"


def test_loop_refuses_an_onnx_file_that_does_not_match_the_model(built, out):
    r = invoke(*loop_args(out / "state", "--model", built["artifact"], "--onnx", c("onnx/other_classes.onnx")))
    assert_fails(r, "classes")


def test_loop_ctrl_c_and_disk_full(built, out, monkeypatch):
    """Ctrl-C while serving: exit 130 and one line (the state folder is kept on purpose: a rerun resumes)."""
    from gprebn_edge.runtime.ort_runner import OnnxRuntimeRunner

    with monkeypatch.context() as m:
        m.setattr(OnnxRuntimeRunner, "_infer", _interrupt_after(5, OnnxRuntimeRunner._infer))
        assert_fails(invoke(*loop_args(out / "a", "--onnx", built["onnx"])), "interrupted", code=130)
    r = invoke(*loop_args(out / "a", "--onnx", built["onnx"]))
    assert r.exit_code == 0 and r.stdout.startswith("resumed"), r.output
    monkeypatch.setattr(os, "fsync", _fsync_fails_at(1))
    assert_fails(invoke(*loop_args(out / "b", "--onnx", built["onnx"])), "cannot write", "No space left")
    assert not (out / "b").exists()  # the disk filled before the first frame: a failed start leaves nothing


LOG_FAILS = [("logs/random_bytes.jsonl", "the log is corrupt"), ("logs/empty.jsonl", "is empty"),
             ("logs/corrupt_middle.jsonl", "line 2"), ("logs/not_records.jsonl", "not a loop record")]


@pytest.mark.parametrize("entry, words", LOG_FAILS, ids=[e for e, _ in LOG_FAILS])
def test_loop_report_refuses_bad_logs(entry, words, out):
    assert_fails(invoke("loop-report", c(entry), "--json", out / "r.json"), words, out=out)


# -- flags, output folders, file names (issue 10) ----------------------------------------------------------------
def _flag_cases(built: dict[str, Path], out: Path) -> dict[str, tuple[list[object], str]]:
    onnx, artifact = built["onnx"], built["artifact"]
    return {
        "adapt --lr nan": (adapt_args(SMALL, out / "a.safetensors", "--lr", "nan"), "--lr must be a finite"),
        "adapt --lr -1": (adapt_args(SMALL, out / "a.safetensors", "--lr", "-1"), "--lr must be at least 0"),
        "adapt --mean nan": (adapt_args(SMALL, out / "a.safetensors", "--mean", "nan"), "--mean must be finite"),
        "adapt --std inf": (adapt_args(SMALL, out / "a.safetensors", "--std", "inf"), "--std must be finite"),
        "bench --duration nan": (["bench", onnx, "--duration", "nan", "--json", out / "b.json"],
                                 "--duration must be a finite"),
        "bench --threads 0": (["bench", onnx, "--threads", "0", "--json", out / "b.json"], "--threads must be"),
        "compare --batch 0": (["compare", onnx, onnx, "--data", SMALL, "--batch", "0", "--json", out / "c.json"],
                              "--batch must be at least 1"),
        "compare --latency-iters -1": (["compare", onnx, onnx, "--data", SMALL, "--latency-iters", "-1", "--json",
                                        out / "c.json"], "--latency-iters must be at least 0"),
        "export --batch x": (["export", artifact, "--onnx", out / "x.onnx", "--batch", "x"], "add --trt"),
        "export --workspace-mb": (["export", artifact, "--onnx", out / "x.onnx", "--workspace-mb", "5"], "add --trt"),
        "demo --out FILE": (["demo", "--quick", "--out", c("misc/model.bin")], "is a file, not a folder"),
        "demo --out FILE/sub": (["demo", "--quick", "--out", Path(c("misc/model.bin")) / "sub"], "cannot write"),
        "bench dynamic size": (["bench", c("onnx/dynamic_size.onnx"), "--iters", "2", "--json", out / "b.json"],
                               "--input-shape C,H,W"),
    }


FLAG_CASES = ["adapt --lr nan", "adapt --lr -1", "adapt --mean nan", "adapt --std inf", "bench --duration nan",
              "bench --threads 0", "compare --batch 0", "compare --latency-iters -1", "export --batch x",
              "export --workspace-mb", "demo --out FILE", "demo --out FILE/sub", "bench dynamic size"]


@pytest.mark.parametrize("case", FLAG_CASES)
def test_bad_flags(case, built, out):
    args, words = _flag_cases(built, out)[case]
    assert_fails(invoke(*args), words, out=out)


def test_demo_out_unwritable_simulated(tmp_path, monkeypatch):
    """--out on a folder it cannot write to (simulated: root writes anywhere): one line before any work."""
    import gprebn_edge.demo

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(gprebn_edge.demo.tempfile, "TemporaryFile", denied)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    assert_fails(invoke("demo", "--quick", "--out", readonly), "cannot write to --out", "Permission denied",
                 out=readonly)


@pytest.mark.skipif(os.name != "posix", reason="file names are bytes only on POSIX")
def test_non_utf8_file_names_in_a_folder(tmp_path, out):
    """Names that are not UTF-8 (made here: git cannot hold them) are read, skipped and fingerprinted like any."""
    data = _good_folder(tmp_path / "data")
    shutil.copy(data / "good_00.png", os.fsencode(data) + b"/good_\xff\xfe.png")
    shutil.copy(CORPUS / "images" / "truncated.png", os.fsencode(data) + b"/cut_\xff.png")
    r = invoke(*adapt_args(str(data), out / "a.safetensors", "--json"))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["skipped"] == 1
    assert invoke("info", out / "a.safetensors").exit_code == 0


# -- coverage ----------------------------------------------------------------------------------------------------
def test_every_entry_is_used():
    """Every corpus entry feeds some case above (the case lists, plus the few used inline)."""
    cases = DATA_FAILS + BAD_IMAGES + MODEL_FAILS + WEIGHT_FAILS + ARTIFACT_FAILS + MODEL_FILE_FAILS + LOG_FAILS
    for entry, *_ in cases:
        c(entry)
    for entry in ("folders/some_corrupt", "folders/modes", "models/untraceable.py", "images/tiny_1x1.png",
                  "onnx/dynamic_size.onnx"):
        c(entry)
    assert sorted(set(ENTRIES) - USED) == []


def test_every_command_has_cases():
    names = {cmd.name or cmd.callback.__name__ for cmd in app.registered_commands if cmd.callback is not None}
    assert names - set(COMMANDS) - {"demo"} == set(), "add bad-input cases for the new command(s)"
