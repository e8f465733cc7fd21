"""The command line's shared pieces: the typer app, the `command` decorator that registers a command under
the one error mapping, per-invocation state, the --json convention, progress and output checks.
Each command module registers its commands with `@command()`."""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand

from gprebn_edge.errors import GprebnError, missing_extra
from gprebn_edge.validate import oneline

__all__ = ["app", "command", "session", "console", "err_console", "cli_errors", "stop_signals", "cooperative_stop",
           "signal_received", "stopped_exit", "progress", "status", "error_line", "STOPPED"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="GpreBN test-time adaptation of BatchNorm CNNs, folded for edge GPUs.")
# user text (paths, specs like synthetic:fog:5, extras like gprebn-edge[vision]) must print as written:
# no rich markup and no :emoji: codes
console = Console(markup=False, emoji=False)
err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)

STOPPED = "interrupted: nothing was written"


@dataclass
class _Session:
    """The state of one invocation, the one place the CLI keeps any: reset by the root callback each time
    the app runs (tests run it many times in one process)."""

    debug: bool = False          # --debug: tracebacks instead of one-line errors
    command: str | None = None   # the sub-command, named by a missing-dependency error
    interrupted: str = STOPPED   # the line for a Ctrl-C (SIGTERM: "terminated"); a command may say more

    def reset(self, debug: bool = False, command: str | None = None) -> None:
        self.debug, self.command, self.interrupted = debug, command, STOPPED


session = _Session()


class _Signals:
    """The first SIGINT or SIGTERM the process got (None: none yet), and whether a line already said so."""
    signum: int | None = None
    reported: bool = False
    finished: bool = False  # a command body ran to its end
    token: Any = None       # a StopToken while a command stops cooperatively (see cooperative_stop)


_signals = _Signals()


F = TypeVar("F", bound=Callable[..., Any])


def command(name: str | None = None) -> Callable[[F], F]:
    """Register a command on `app` with its body under `cli_errors`, the one error mapping: the body only
    parses, calls one library function and prints."""
    def register(body: F) -> F:
        @functools.wraps(body)  # typer reads the options from the wrapped signature
        def mapped(*args: Any, **kwargs: Any) -> Any:
            session.interrupted = STOPPED  # a command that writes elsewhere (loop) says so itself
            with cli_errors():
                return body(*args, **kwargs)

        app.command(name, cls=_Command)(mapped)
        return mapped  # type: ignore[return-value]
    return register


class _Command(TyperCommand):
    """A command whose `--json` also works bare: the older flag form (`adapt ... --json`) means `--json -`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if any("--json" in getattr(p, "opts", ()) for p in self.params):
            args = bare_json_as_stdout(args)
        return super().parse_args(ctx, args)


def bare_json_as_stdout(args: list[str]) -> list[str]:
    """`--json` given last, or followed by another option, gets the value `-` (stdout)."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":  # the rest are arguments, not options
            return out + args[i:]
        out.append(arg)
        following = args[i + 1] if i + 1 < len(args) else None
        if arg == "--json" and (following is None or (following.startswith("-") and following != "-")):
            out.append("-")
    return out


def error_line(label: str, message: str) -> Text:
    return Text.assemble((label, "red"), " ", message)


@app.callback()
def _root(ctx: typer.Context,
          debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    session.reset(debug=debug, command=ctx.invoked_subcommand)


@contextlib.contextmanager
def cli_errors(interrupted: str | None = None) -> Iterator[None]:
    """Map the project's errors to one line and exit code 1; anything else to exit code 2; Ctrl-C to 130
    with the line `interrupted` (default: the session's), and SIGTERM (see `stop_signals`) to 143 with that
    line saying "terminated". Commands get it from `@command()`."""
    try:
        try:
            yield
        except ModuleNotFoundError as e:  # an extra this install lacks (torch): one line naming it
            missing = missing_extra(e, session.command)
            if missing is None:
                raise
            raise missing from e
        _signals.finished = True
    except GprebnError as e:
        if _signals.signum is not None:  # the stop signal broke the work (e.g. an import): report the stop
            _report_stop(interrupted or session.interrupted, _signals.signum)
        if session.debug:
            raise
        err_console.print(error_line("error:", str(e)), soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _report_stop(interrupted or session.interrupted, _signals.signum or signal.SIGINT)
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:  # a bug, not a user error: still one line unless --debug
        if session.debug:
            raise
        first = oneline(e) if str(e).strip() else ""
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


def _on_signal(signum: int, frame: object) -> None:
    """The CLI's one signal handler. The first SIGINT or SIGTERM is recorded; then, inside
    `cooperative_stop`, it only asks the command to stop at its next safe point, and elsewhere it raises
    KeyboardInterrupt in the main thread. Later ones are ignored while the command stops, so a second Ctrl-C
    cannot cut the clean-up into a traceback."""
    if _signals.signum is not None:
        return
    _signals.signum = signum
    if _signals.token is not None:
        _signals.token.request()
        return
    raise KeyboardInterrupt


def _install() -> dict[int, Any]:
    return {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}


def stop_signals() -> None:
    """Make SIGTERM stop a command the way Ctrl-C does, for every command at once (the console-script entry
    installs it): `cli_errors` turns the KeyboardInterrupt into one line and exit 130 or 143, atomic writes
    leaving no partial file."""
    if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
        _install()


def signal_received() -> int | None:
    """The first SIGINT or SIGTERM this process got, None when none."""
    return _signals.signum


@contextlib.contextmanager
def cooperative_stop() -> Iterator[Any]:
    """For a command that must not be interrupted inside native code (the loop: its worker thread runs
    torch): the same handler, but a signal only sets the yielded StopToken, which the command reads at its
    safe points; it then raises KeyboardInterrupt itself, and `cli_errors` reports the stop as for any
    command. The previous handlers come back afterwards."""
    from gprebn_edge.device.stop import StopToken

    token = StopToken()
    if _signals.signum is not None:  # already asked to stop
        token.request()
    _signals.token = token
    old = _install() if threading.current_thread() is threading.main_thread() else {}
    try:
        yield token
    finally:
        _signals.token = None
        for s, h in old.items():
            signal.signal(s, h)


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
