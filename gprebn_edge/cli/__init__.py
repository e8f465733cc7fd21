"""`gprebn-edge`: a thin command-line skin over the library. Each command parses, checks its flags, calls
one library function and prints. Errors the user can fix are one line on stderr and exit code 1; the
traceback only with --debug."""

from __future__ import annotations

import importlib
import sys

from gprebn_edge.cli._app import app, err_console, error_line
from gprebn_edge.errors import GprebnError

# each module registers its commands on `app`, in this order, which is the order of `gprebn-edge --help`
for _module in ("adapt_cmds", "export_cmd", "runtime_cmds", "loop_cmds", "demo_cmd"):
    importlib.import_module(f"gprebn_edge.cli.{_module}")

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except GprebnError as e:  # raised outside a command body (e.g. while parsing)
        err_console.print(error_line("error:", str(e)), soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
