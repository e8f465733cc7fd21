"""Copy the TensorRT type stubs (`pip install --no-deps tensorrt-stubs`) to typings/tensorrt/__init__.pyi,
mended so that they parse, for mypy to check our calls into TensorRT.

As shipped, tensorrt_bindings/tensorrt.pyi is not valid Python: a few plugin methods name parameters `in`
and `out` (keywords), and `add_scale_nd` puts a parameter without a default after defaulted ones. The stub
also lacks the package's `__version__`. Exits non-zero with the fix if the stubs are not installed.

    python scripts/fix_trt_stubs.py [DIR]     # DIR: where `pip install --target DIR tensorrt-stubs` put them"""

from __future__ import annotations

import ast
import importlib.util
import keyword
import re
import site
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "typings" / "tensorrt" / "__init__.pyi"
STUB = Path("tensorrt_bindings") / "tensorrt.pyi"
DEF = re.compile(r"^(\s*def \w+\()(.*)(\)\s*(?:->.*)?:\s*)$")


def find_stub(where: Path | None = None) -> Path | None:
    """tensorrt_bindings/tensorrt.pyi under `where` (a `pip install --target` folder), else looked up like
    an import, then in site-packages."""
    if where is not None:
        return where / STUB if (where / STUB).is_file() else None
    spec = importlib.util.find_spec("tensorrt_bindings")
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    roots = [sysconfig.get_paths()["purelib"], *site.getsitepackages(), site.getusersitepackages()]
    folders += [Path(r) / "tensorrt_bindings" for r in roots]
    return next((f / STUB.name for f in folders if (f / STUB.name).is_file()), None)


def split_params(params: str) -> list[str]:
    """Split a parameter list on its top-level commas (annotations hold brackets and commas)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(params):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(params[start:i])
            start = i + 1
    parts.append(params[start:])
    return [p.strip() for p in parts if p.strip()]


def mend_def(line: str) -> str:
    """Rename keyword parameters (`in` -> `in_`) and give `= ...` to a parameter without a default that
    follows defaulted ones; other lines come back unchanged."""
    m = DEF.match(line)
    if not m:
        return line
    head, params, tail = m.groups()
    out, seen_default = [], False
    for p in split_params(params):
        name = p.lstrip("*/ ").split(":")[0].split("=")[0].strip()
        if keyword.iskeyword(name):
            p = p.replace(name, name + "_", 1)
        if "=" in p:
            seen_default = True
        elif seen_default and not p.startswith(("*", "/")):
            p += " = ..."
        out.append(p)
    mended = f"{head}{', '.join(out)}{tail}"
    return mended if split_params(params) != out else line


def mend(text: str) -> tuple[str, int]:
    lines = text.splitlines(keepends=True)
    fixed = [mend_def(line.rstrip("\n")) + ("\n" if line.endswith("\n") else "") for line in lines]
    changed = sum(a != b for a, b in zip(lines, fixed, strict=True))
    body = "".join(fixed)
    if not re.search(r"^__version__\b", body, re.M):
        body += "\n__version__: str\n"
    return body, changed


def main() -> int:
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    stub = find_stub(where)
    if stub is None:
        print(f"tensorrt-stubs is not installed{f' in {where}' if where else ''}: pip install --no-deps --target "
              "DIR tensorrt-stubs==10.13.0.35.1 and pass DIR (--no-deps: its dependencies would pull the full "
              "TensorRT; --target: installed beside a real TensorRT its empty `tensorrt` package would shadow it)",
              file=sys.stderr)
        return 1
    body, changed = mend(stub.read_text(encoding="utf-8"))
    try:
        ast.parse(body, filename=str(stub))
    except SyntaxError as e:
        print(f"{stub} still does not parse after mending line {e.lineno}: {e.msg}; "
              f"extend scripts/fix_trt_stubs.py for this stub version", file=sys.stderr)
        return 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(OUT)
    print(f"{OUT.relative_to(ROOT)}: from {stub}, {changed} lines mended")
    return 0


if __name__ == "__main__":
    sys.exit(main())
