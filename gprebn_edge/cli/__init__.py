"""`gprebn-edge`: a thin command-line skin over the library. Each command parses, checks its flags, calls
one library function and prints. Errors the user can fix are one line on stderr and exit code 1; the
traceback only with --debug."""

from __future__ import annotations

import importlib
import sys

from gprebn_edge.cli._app import app, err_console, error_line, session, stop_signals, stopped_exit
from gprebn_edge.errors import GprebnError, missing_extra

# each module registers its commands on `app`, in this order, which is the order of `gprebn-edge --help`
for _module in ("adapt_cmds", "export_cmd", "runtime_cmds", "loop_cmds", "demo_cmd"):
    importlib.import_module(f"gprebn_edge.cli.{_module}")

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point. SIGTERM stops every command the way Ctrl-C does (exit 143 instead of 130,
    one line, no partial output): see `stop_signals`."""
    stop_signals()
    try:
        try:
            app()
        except GprebnError as e:  # raised outside a command body (e.g. while parsing)
            err_console.print(error_line("error:", str(e)), soft_wrap=True)
            sys.exit(1)
        except ModuleNotFoundError as e:  # an extra (torch) imported before a command's error mapping
            missing = missing_extra(e, session.command)
            if missing is None or session.debug:
                raise
            err_console.print(error_line("error:", str(missing)), soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:  # a signal outside typer's own handling (e.g. before it started)
            sys.exit(130)
    except SystemExit as e:
        sys.exit(stopped_exit(e.code))


if __name__ == "__main__":
    main()
