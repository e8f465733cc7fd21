"""Data never runs code: an artifact whose metadata names model code (a forged one: an absolute file, a
relative file, a module, `os:abort`) is refused by every command that rebuilds a model from it, in one line
that says how to consent, and the code does not run (a marker file it would write never appears; `os:abort`
does not kill the process). With consent (export's --model SPEC, or --trust-model-code) it does run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from gprebn_edge.checkpoint import rebuild_model
from gprebn_edge.cli import app
from gprebn_edge.consent import TRUST_ALL, CodeConsent, require_consent, same_code
from gprebn_edge.errors import ModelError
from gprebn_edge.runtime.loading import open_runner
from gprebn_edge.stages import CHECKPOINTS

runner = CliRunner()
DATA = "synthetic:fog:5:n=8"

# Model code that leaves a marker when imported and when its factory is called, then builds the real builtin
# model (so that, with consent, the forged artifact's weights load and the command runs to the end).
FORGED_CODE = """\
from pathlib import Path

MARKER = Path({marker!r})
MARKER.write_text("imported\\n")


def make(num_classes=None):
    MARKER.write_text("imported\\nfactory called\\n")
    from gprebn_edge.models.builtin import BUILTIN_MODELS

    factory = BUILTIN_MODELS["small_resnet"]
    return factory(num_classes=num_classes) if num_classes else factory()
"""


def forge(artifact: Path, out: Path, spec: str) -> Path:
    """A copy of `artifact` whose metadata names `spec` as its model."""
    with safe_open(str(artifact), framework="pt") as f:
        header = f.metadata()
    meta = json.loads(header["gprebn_edge"])
    meta["model"]["spec"] = spec
    save_file(load_file(str(artifact)), str(out), metadata={"gprebn_edge": json.dumps(meta)})
    return out


@pytest.fixture(scope="module")
def real_artifact(tmp_path_factory) -> Path:
    """A real adapted artifact of builtin:small_resnet, made once."""
    out = tmp_path_factory.mktemp("real") / "real.safetensors"
    r = runner.invoke(app, ["adapt", "--model", "builtin:small_resnet", "--data", "synthetic:fog:5:n=24",
                            "--batch-size", "8", "--holdout", "0", "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def forged(real_artifact, tmp_path, monkeypatch):
    """(folder, marker, {kind: forged artifact}) for an absolute file, a relative file and a module; the
    working folder is `folder` (where the relative file lies) and the module is importable."""
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    marker = tmp_path / "MARKER"
    for name in ("evil.py", "relative.py", "evil_module.py"):
        (code_dir / name).write_text(FORGED_CODE.format(marker=str(marker)))
    monkeypatch.chdir(code_dir)
    monkeypatch.syspath_prepend(str(code_dir))
    specs = {"absolute": f"{code_dir / 'evil.py'}:make", "relative": "relative.py:make",
             "module": "evil_module:make"}
    artifacts = {kind: forge(real_artifact, tmp_path / f"forged_{kind}.safetensors", spec)
                 for kind, spec in specs.items()}
    yield tmp_path, marker, artifacts, specs
    sys.modules.pop("evil_module", None)


def refused(r, spec: str, fix: str) -> None:
    """Exit code 1 and one line that names the code and the option that consents."""
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert spec in lines[0] and fix in lines[0] and "consent" in lines[0], lines[0]


def commands(artifact: Path, folder: Path) -> dict[str, list[str]]:
    out = folder / "out"
    out.mkdir(exist_ok=True)
    return {
        "export": ["export", str(artifact), "--onnx", str(out / "x.onnx"), "--data", DATA, "--check-images", "8"],
        "bench": ["bench", str(artifact), "--iters", "2", "--warmup", "1", "--input-shape", "3,32,32"],
        "compare": ["compare", str(artifact), str(artifact), "--data", DATA, "--latency-iters", "0"],
        "loop": ["loop", "--model", str(artifact), "--state", str(out / "state"), "--source", DATA,
                 "--frames", "4"],
    }


# -- the library ------------------------------------------------------------------------------------------------
def test_rebuild_model_refuses_code_without_consent(forged):
    _, marker, artifacts, specs = forged
    for kind, artifact in artifacts.items():
        with pytest.raises(ModelError, match="not imported without your consent") as e:
            rebuild_model(artifact)
        assert specs[kind] in str(e.value) and "--trust-model-code" in str(e.value)
        assert not marker.exists(), kind
    with pytest.raises(ModelError, match="consent"):
        open_runner(artifacts["absolute"], checkpoints=CHECKPOINTS).activate()
    assert not marker.exists()


def test_rebuild_model_with_consent_runs_the_code(forged):
    _, marker, artifacts, specs = forged
    model, _ = rebuild_model(artifacts["absolute"], consent=CodeConsent(spec=specs["absolute"]))
    assert marker.read_text() == "imported\nfactory called\n" and not model.training
    marker.unlink()
    rebuild_model(artifacts["module"], "source", consent=TRUST_ALL)
    assert marker.exists()


def test_consent_to_one_spec_is_not_consent_to_another(forged, tmp_path):
    _, marker, artifacts, specs = forged
    other = tmp_path / "other.py"
    other.write_text("def make():\n    raise SystemExit('must not run')\n")
    for given in (f"{other}:make", f"{Path(specs['absolute'].rsplit(':', 1)[0])}:other", "evil_module:other",
                  "builtin:small_resnet"):
        with pytest.raises(ModelError, match="pass --model") as e:
            rebuild_model(artifacts["absolute"], consent=CodeConsent(spec=given, flag="--model"))
        assert f"--model {specs['absolute']}" in str(e.value)
    assert not marker.exists()


def test_same_code_compares_resolved_files(tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text("")
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "net.py", tmp_path / "link.py")
    monkeypatch.chdir(tmp_path / "sub")
    assert same_code("../net.py:make", f"{tmp_path}/net.py:make")
    assert same_code(f"{tmp_path}/link.py:make", f"{tmp_path}/net.py:make")  # the file that would run
    assert not same_code(f"{tmp_path}/net.py:make", f"{tmp_path}/net.py:build")
    assert not same_code("pkg.mod:make", "pkg.other:make") and same_code("pkg.mod:make", "pkg.mod:make")


def test_builtin_and_torchvision_need_no_consent_and_bad_specs_run_nothing():
    require_consent("builtin:small_resnet", None, "a.safetensors")
    require_consent("torchvision:resnet18", None, "a.safetensors")
    for spec in ("os:abort", "subprocess:getoutput", "x.py:make"):
        with pytest.raises(ModelError, match="--trust-model-code"):
            require_consent(spec, None, "a.safetensors")
    with pytest.raises(ModelError, match="factory function name"):
        require_consent("x.py:1; import os", TRUST_ALL, "a.safetensors")


# -- the commands -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["absolute", "relative", "module"])
@pytest.mark.parametrize("command", ["export", "bench", "compare", "loop"])
def test_commands_refuse_a_forged_artifact(forged, command, kind):
    folder, marker, artifacts, specs = forged
    r = runner.invoke(app, commands(artifacts[kind], folder)[command])
    refused(r, specs[kind], "--model" if command == "export" else "--trust-model-code")
    assert not marker.exists()
    assert not list((folder / "out").iterdir()), "nothing is written"


def test_info_shows_the_spec_and_never_imports_it(forged):
    _, marker, artifacts, specs = forged
    for kind, artifact in artifacts.items():
        r = runner.invoke(app, ["info", str(artifact)])
        assert r.exit_code == 0, r.output
        assert json.loads(runner.invoke(app, ["info", str(artifact), "--json"]).stdout)["model"]["spec"] == specs[kind]
    assert not marker.exists()


def test_export_with_model_naming_the_code_runs_it(forged):
    folder, marker, artifacts, specs = forged
    args = commands(artifacts["relative"], folder)["export"]
    # another spec is not consent, even to a builtin
    r = runner.invoke(app, [*args, "--model", "builtin:small_resnet"])
    assert r.exit_code == 1 and "--model relative.py:make" in r.stderr and not marker.exists()
    # the same code, named as an absolute path: consent
    r = runner.invoke(app, [*args, "--model", f"{folder / 'code' / 'relative.py'}:make", "--json"])
    assert r.exit_code == 0, r.output
    assert "factory called" in marker.read_text()


@pytest.mark.parametrize("command", ["bench", "compare", "export", "loop"])
def test_trust_model_code_runs_it(forged, command):
    folder, marker, artifacts, _ = forged
    r = runner.invoke(app, [*commands(artifacts["absolute"], folder)[command], "--trust-model-code"])
    assert r.exit_code == 0, r.output
    assert "factory called" in marker.read_text()


def test_os_abort_is_not_called(forged):
    """In a fresh process each: the refusal, exit code 1, and the process alive to print it; with consent,
    os.abort runs and kills the process (so the test would see it)."""
    folder, _, artifacts, _ = forged
    artifact = forge(artifacts["absolute"], folder / "abort.safetensors", "os:abort")
    cli = [sys.executable, "-c", "from gprebn_edge.cli import main; main()"]
    for command, args in commands(artifact, folder).items():
        p = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=300, cwd=folder)
        assert p.returncode == 1, (command, p.returncode, p.stderr)
        assert "os:abort" in p.stderr and "consent" in p.stderr, (command, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = subprocess.run([*cli, *commands(artifact, folder)["bench"], "--trust-model-code"], capture_output=True,
                       text=True, timeout=300, cwd=folder)
    assert p.returncode == -6, (p.returncode, p.stderr)  # SIGABRT
