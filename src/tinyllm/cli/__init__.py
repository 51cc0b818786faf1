"""The `tinyllm` command: parsing and printing only; the work happens in the library.

One module per group of commands; each registers its commands on `app`.
"""

from __future__ import annotations

import logging
import sys

from rich.logging import RichHandler
from rich.markup import escape

from tinyllm.cli import compress, estimate, export, inspect, recipes, runtime, tasks  # noqa: F401  (registers)
from tinyllm.cli._common import err
from tinyllm.cli.app import app
from tinyllm.errors import TinyLLMError

__all__ = ["app", "main"]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)],
    )


def main() -> None:
    """Entry point: a TinyLLMError prints one line and exits 1; Ctrl-C exits 130."""
    _setup_logging("-v" in sys.argv or "--verbose" in sys.argv)
    argv = [a for a in sys.argv[1:] if a not in ("-v", "--verbose")]
    if "--no-verify" in argv:  # a global option, also accepted after the command
        argv = ["--no-verify", *[a for a in argv if a != "--no-verify"]]
    try:
        app(args=argv, standalone_mode=True)
    except TinyLLMError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
