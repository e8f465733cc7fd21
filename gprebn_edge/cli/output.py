"""What commands write besides their tables: the --json convention, output checks before any work, notes.

--json PATH writes the JSON atomically to PATH and the human output is printed as usual (with a line
`json: PATH`); --json - prints only the JSON on stdout, so a script can pipe it, and everything else a
command would say goes to stderr."""

from __future__ import annotations

from pathlib import Path

import typer

from gprebn_edge.cli._app import console, err_console
from gprebn_edge.errors import GprebnError
from gprebn_edge.io import write_text_atomic

__all__ = ["json_to_stdout", "emit_json", "note", "check_outputs", "existing", "say_replaced"]

STDOUT = Path("-")


def json_to_stdout(target: Path | None) -> bool:
    """Whether --json asked for the JSON on stdout (instead of the human output)."""
    return target == STDOUT


def _files(paths: tuple[Path | None, ...]) -> list[Path]:
    return [p for p in paths if p is not None and p != STDOUT]


def emit_json(target: Path | None, text: str) -> None:
    """Print `text` on stdout for `--json -`, or write it atomically to the --json PATH and say so."""
    if target is None:
        return
    if json_to_stdout(target):
        typer.echo(text)
        return
    write_text_atomic(target, text + "\n")
    console.print(f"json: {target}", soft_wrap=True)


def note(text: str, target: Path | None) -> None:
    """A line such as `plot: PATH`: on stdout, or on stderr when stdout carries the JSON."""
    (err_console if json_to_stdout(target) else console).print(text, soft_wrap=True)


def check_outputs(*paths: Path | None) -> None:
    """Fail before any work when an output cannot be written."""
    for path in _files(paths):
        if path.is_dir() or not (path.parent if str(path.parent) else Path(".")).is_dir():
            raise GprebnError(f"cannot write {path}: give a file in an existing folder")


def existing(*paths: Path | None) -> list[Path]:
    """The outputs that exist before a run (checked before any work: `say_replaced` names them after it)."""
    return [p for p in _files(paths) if p.is_file()]


def say_replaced(paths: list[Path]) -> None:
    """One line on stderr naming the files a successful run replaced."""
    if paths:
        err_console.print(f"replaced existing {', '.join(map(str, paths))}", soft_wrap=True)
