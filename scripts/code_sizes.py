"""Module and function sizes of the package (issue 13: modules a newcomer can hold in their head).

    python scripts/code_sizes.py [--module-lines 350] [--function-lines 60] [--json PATH]

Prints a markdown table of the modules over --module-lines lines and the functions (methods included) over
--function-lines lines, largest first, and the totals; --json also writes them. Lines are counted as in the
file (docstrings and comments included), functions from their `def` to their last line."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gprebn_edge", "export", "runtime")


def sizes(root: Path = ROOT) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(module, lines) and (module:function, lines) for every .py file of the package."""
    modules, functions = [], []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            rel = path.relative_to(root).as_posix()
            modules.append((rel, len(text.splitlines())))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    functions.append((f"{rel}:{node.name}", (node.end_lineno or node.lineno) - start + 1))
    return modules, functions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module-lines", type=int, default=350)
    parser.add_argument("--function-lines", type=int, default=60)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    modules, functions = sizes()
    big_modules = sorted((m for m in modules if m[1] > args.module_lines), key=lambda m: -m[1])
    big_functions = sorted((f for f in functions if f[1] > args.function_lines), key=lambda f: -f[1])
    print(f"{len(modules)} modules, {sum(n for _, n in modules)} lines; {len(functions)} functions, the largest "
          f"{max(n for _, n in functions)} lines\n")
    print(f"| module over {args.module_lines} lines | lines |\n|---|---:|")
    print("\n".join(f"| {m} | {n} |" for m, n in big_modules) or "| (none) | |")
    print(f"\n| function over {args.function_lines} lines | lines |\n|---|---:|")
    print("\n".join(f"| {f} | {n} |" for f, n in big_functions) or "| (none) | |")
    if args.json:
        args.json.write_text(json.dumps({"modules": dict(modules), "functions": dict(functions),
                                         "limits": {"module": args.module_lines, "function": args.function_lines}},
                                        indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
