"""Every module imports, and the CLI's help works, without optional dependencies (Polygraphy's
test_dependencies idea): heavy libraries are imported only where used."""

import importlib
import pkgutil
import subprocess
import sys

import gprebn_edge

OPTIONAL = ("tensorrt", "torchvision", "cv2", "onnxruntime", "matplotlib", "cuda")


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(gprebn_edge.__path__, "gprebn_edge.")]
    assert "gprebn_edge.methods.layer" in names
    # export/ and runtime/ are mapped into the namespace by pyproject's package-dir
    for pkg in (importlib.import_module("gprebn_edge.export"), importlib.import_module("gprebn_edge.runtime")):
        names += [pkg.__name__] + [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    assert "gprebn_edge.export.fold" in names
    for name in names:
        importlib.import_module(name)


def test_cli_help_loads_no_optional_library():
    code = ("import sys; from gprebn_edge.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['adapt', '--help']); assert r.exit_code == 0, r.output; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

# Importing the runtime without torch is tested module by module, with torch blocked by a meta-path finder,
# in tests/runtime/test_without_torch.py (a check of gprebn_edge.runtime's empty __init__ alone could not fail).
