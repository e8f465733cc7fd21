"""Copy the TensorRT type stubs (`pip install --no-deps tensorrt-stubs`) to typings/tensorrt/__init__.pyi,
mended so that they parse, for mypy to check our calls into TensorRT.

As shipped, tensorrt_bindings/tensorrt.pyi is not valid Python: a few plugin methods name parameters `in`
and `out` (keywords), and `add_scale_nd` puts a parameter without a default after defaulted ones. The stub
also lacks the package's `__version__`. Exits non-zero with the fix if the stubs are not installed.

PyPI has no TensorRT 11 stubs (tensorrt-stubs stops at 10.13). `--trt11` writes, to
typings/trt11/tensorrt/__init__.pyi, the 10.x stub less the Python APIs that TensorRT 11 removes (its
migration guide's "Removed Python APIs and Replacements"), so that `MYPYPATH=typings/trt11 mypy` fails on
any call of ours that TensorRT 11 no longer has: a check against the removals, not a full 11.x stub.

    python scripts/fix_trt_stubs.py [--trt11] [DIR]   # DIR: where `pip install --target DIR tensorrt-stubs` went"""

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
OUT_11 = ROOT / "typings" / "trt11" / "tensorrt" / "__init__.pyi"
# TensorRT 10.x -> 11.x migration guide, "Removed Python APIs and Replacements": class -> members removed
REMOVED_IN_11 = {
    "BuilderFlag": {"FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                    "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"},
    "IBuilderConfig": {"int8_calibrator", "set_calibration_profile", "get_calibration_profile",
                       "set_quantization_flag", "get_quantization_flag", "quantization_flags",
                       "clear_quantization_flag", "algorithm_selector"},
    "ICudaEngine": {"device_memory_size"},
    "Builder": {"platform_has_fast_fp16", "platform_has_fast_int8"},
}
REMOVED_CLASSES_11 = re.compile(r"^(IInt8\w*Calibrator\w*|IAlgorithm\w*|CalibrationAlgoType|QuantizationFlag)$")
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


def _name(node: ast.stmt) -> str | None:
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        return node.name
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


def without_removed_in_11(body: str) -> tuple[str, int]:
    """The stub less the classes and members TensorRT 11 removes; also the count removed."""
    tree = ast.parse(body)
    removed = 0
    kept: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and REMOVED_CLASSES_11.match(node.name):
            removed += 1
            continue
        if isinstance(node, ast.ClassDef) and node.name in REMOVED_IN_11:
            gone = REMOVED_IN_11[node.name]
            before = len(node.body)
            node.body = [n for n in node.body if _name(n) not in gone] or [ast.Expr(ast.Constant(...))]
            removed += before - len(node.body)
        kept.append(node)
    tree.body = kept
    return ast.unparse(tree) + "\n", removed


def main() -> int:
    args = sys.argv[1:]
    trt11 = "--trt11" in args
    args = [a for a in args if a != "--trt11"]
    where = Path(args[0]) if args else None
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
    out, note = OUT, f"{changed} lines mended"
    if trt11:
        body, removed = without_removed_in_11(body)
        out, note = OUT_11, f"{note}, {removed} APIs removed in TensorRT 11 taken out"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(out)
    print(f"{out.relative_to(ROOT)}: from {stub}, {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
