"""The layers point one way (docs/design.md): shared helpers at the bottom, then runtime, export and adapt, with
cli, device and demo on top. Read from the AST, so imports inside functions count too: a lazy import still
ties a layer to what it imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> the gprebn_edge modules (and their submodules) that no file in it may import
FORBIDDEN = {
    "runtime": ("gprebn_edge.checkpoint", "gprebn_edge.adaptation", "gprebn_edge.models", "gprebn_edge.methods",
                "gprebn_edge.health", "gprebn_edge.export", "gprebn_edge.device", "gprebn_edge.cli",
                "gprebn_edge.demo", "gprebn_edge.api"),
    "export": ("gprebn_edge.adaptation", "gprebn_edge.methods", "gprebn_edge.health", "gprebn_edge.device",
               "gprebn_edge.cli", "gprebn_edge.demo", "gprebn_edge.api"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in a file, `from a import b` giving both a and a.b."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def crossings(folder: str) -> list[str]:
    """One line per import statement of `folder` that reaches a forbidden module."""
    out: dict[tuple[str, int], str] = {}
    for path in sorted((ROOT / folder).glob("*.py")):
        for line, module in imported_modules(path):
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[folder]):
                out.setdefault((str(path.relative_to(ROOT)), line), module)
    return [f"{where}:{line} imports {module}" for (where, line), module in sorted(out.items())]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_layer_imports_a_layer_above_it(folder):
    assert crossings(folder) == []


def test_the_scan_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n"
                      "    from gprebn_edge.checkpoint import load_checkpoint\n"
                      "    import gprebn_edge.adapt\n")
    assert imported_modules(source) == [(2, "gprebn_edge.checkpoint"), (2, "gprebn_edge.checkpoint.load_checkpoint"),
                                        (3, "gprebn_edge.adapt")]


if __name__ == "__main__":  # python tests/test_layers.py: list the crossings of the working tree
    for name in sorted(FORBIDDEN):
        rows = crossings(name)
        print(f"{name}/: {len(rows)} crossing(s)")
        print("\n".join(f"  {r}" for r in rows))
