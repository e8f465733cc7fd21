"""The command line's shared pieces: the typer app, the error mapping, progress and small formatters.
Each command module registers its commands on `app`."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gprebn_edge.errors import GprebnError, missing_extra

__all__ = ["app", "console", "err_console", "cli_errors", "stop_signals", "stopped_exit", "progress", "status",
           "key_value_table", "pct",
           "check_outputs", "error_line", "existing", "say_replaced", "BACKEND_HELP", "TRUST_HELP", "VERIFY_HELP"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="GpreBN test-time adaptation of BatchNorm CNNs, folded for edge GPUs.")
# user text (paths, specs like synthetic:fog:5, extras like gprebn-edge[vision]) must print as written:
# no rich markup and no :emoji: codes
console = Console(markup=False, emoji=False)
err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)
_state: dict[str, Any] = {"debug": False, "command": None}


class _Signals:
    """The first SIGINT or SIGTERM the process got (None: none yet), and whether a line already said so."""
    signum: int | None = None
    reported: bool = False
    finished: bool = False  # a command body ran to its end


_signals = _Signals()


def error_line(label: str, message: str) -> Text:
    return Text.assemble((label, "red"), " ", message)


@app.callback()
def _root(ctx: typer.Context,
          debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug
    _state["command"] = ctx.invoked_subcommand  # named by a missing-dependency error


@contextlib.contextmanager
def cli_errors(interrupted: str = "interrupted: nothing was written") -> Iterator[None]:
    """Map the project's errors to one line and exit code 1; anything else to exit code 2; Ctrl-C to 130
    with the line `interrupted`, and SIGTERM (see `stop_signals`) to 143 with that line saying "terminated"."""
    try:
        try:
            yield
        except ModuleNotFoundError as e:  # an extra this install lacks (torch): one line naming it
            missing = missing_extra(e, _state["command"])
            if missing is None:
                raise
            raise missing from e
        _signals.finished = True
    except GprebnError as e:
        if _signals.signum is not None:  # the stop signal broke the work (e.g. an import): report the stop
            _report_stop(interrupted, _signals.signum)
        if _state["debug"]:
            raise
        err_console.print(error_line("error:", str(e)), soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _report_stop(interrupted, _signals.signum or signal.SIGINT)
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:  # a bug, not a user error: still one line unless --debug
        if _state["debug"]:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        err_console.print(error_line("internal error:", f"{type(e).__name__}: {first} (rerun with --debug for "
                                      "the traceback and report it)"), soft_wrap=True)
        raise typer.Exit(2) from None


def _report_stop(interrupted: str, signum: int) -> NoReturn:
    """One line for a command stopped by Ctrl-C or SIGTERM ("interrupted" becomes "terminated" for SIGTERM)
    and exit 128 + signal. A signal that lands inside a C extension's import surfaces as an ImportError, and
    from there as the project's error: the signal, not that error, is the cause."""
    if signum == signal.SIGTERM:
        head, sep, rest = interrupted.partition("interrupted")
        interrupted = f"{head}terminated{rest}" if sep else f"terminated: {interrupted}"
    err_console.print(interrupted, soft_wrap=True)
    _signals.reported = True
    raise typer.Exit(128 + signum) from None


def stop_signals() -> None:
    """Make SIGTERM stop a command the way Ctrl-C does, for every command at once (the console-script entry
    installs it): the first SIGINT or SIGTERM raises KeyboardInterrupt in the main thread, which `cli_errors`
    turns into one line and exit 130 or 143, atomic writes leaving no partial file; later ones are ignored
    while the command stops, so a second Ctrl-C cannot cut the clean-up into a traceback. A command with its
    own handling (`loop`) installs its handlers over these and puts them back afterwards."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        return

    def handler(signum: int, frame: object) -> None:
        if _signals.signum is None:
            _signals.signum = signum
            raise KeyboardInterrupt

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


def stopped_exit(code: int | str | None) -> int | str | None:
    """The exit code for a run that ends with `code`: when a signal stopped it outside any command body
    (while parsing, or after the command's work) no line has said so yet: say it here, and exit 128 + signal."""
    if _signals.signum is None:
        return code
    # from here on the process only exits: ignore further signals outright. Python's finalization puts Python
    # handlers back to the default, so a second Ctrl-C or SIGTERM there would kill it silently with another
    # status; signal.signal runs any pending one through the old handler (which ignores it) before switching.
    with contextlib.suppress(OSError, ValueError):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
    if _signals.reported:
        return code
    _signals.reported = True
    word = "terminated" if _signals.signum == signal.SIGTERM else "interrupted"
    what = "the command had finished" if _signals.finished else "nothing was written"
    err_console.print(f"{word}: {what}", soft_wrap=True)
    return 128 + _signals.signum


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Yield update(description, done, total); the bar appears on the first update, so a command that fails
    while loading prints its one error line and nothing else."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar: Progress | None = None
    task = None

    def update(description: str, done: int, total: int) -> None:
        nonlocal bar, task
        if not enabled:
            return
        if bar is None:
            bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), console=err_console, transient=True)
            bar.start()
            task = bar.add_task(description, total=total)
        assert task is not None
        bar.update(task, description=description, completed=done, total=total)

    try:
        yield update
    finally:
        if bar is not None:
            bar.stop()


@contextlib.contextmanager
def status() -> Iterator[Callable[[str], None]]:
    """Yield say(message): a transient spinner line on stderr for work without a count of steps."""
    status = None

    def say(message: str) -> None:
        nonlocal status
        if status is None:
            status = err_console.status(message)
            status.start()
        else:
            status.update(message)

    try:
        yield say
    finally:
        if status is not None:
            status.stop()


def key_value_table(title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")  # paths and hashes wrap whole, never cut with an ellipsis
    return table


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"

def check_outputs(*paths: Path | None) -> None:
    """Fail before any work when an output cannot be written."""
    for path in paths:
        if path is not None and (path.is_dir() or not (path.parent if str(path.parent) else Path(".")).is_dir()):
            raise GprebnError(f"cannot write {path}: give a file in an existing folder")


TRUST_HELP = ("Import whatever model code (file.py:factory, module:factory) a checkpoint names: only for "
              "checkpoints you trust, since that code runs. builtin: and torchvision: models, ONNX files and "
              "engines need no consent.")

VERIFY_HELP = ("Check an ONNX file or engine against the sha256 its export manifest (NAME.manifest.json beside "
               "it) records, and refuse it when they differ; --no-verify runs it anyway.")


def existing(*paths: Path | None) -> list[Path]:
    """The outputs that exist before a run (checked before any work: `say_replaced` names them after it)."""
    return [p for p in paths if p is not None and p.is_file()]


def say_replaced(paths: list[Path]) -> None:
    """One line on stderr naming the files a successful run replaced."""
    if paths:
        err_console.print(f"replaced existing {', '.join(map(str, paths))}", soft_wrap=True)


BACKEND_HELP = "auto (by suffix: .onnx onnxruntime, .engine/.plan tensorrt, .safetensors torch), onnxruntime, " \
                "torch or tensorrt."
