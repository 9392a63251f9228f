"""Which errors the command line reports as one line (exit code 2) instead of a traceback: bad
input (:class:`UserError`, whose message names the file or option at fault) and files that cannot
be read or written (``OSError``). Anything else is a bug and keeps its traceback. Error lines go to
standard error, so a command's standard output (``--json``) holds only its result."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console

from hydraopt_mobile.errors import UserError

USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)


def report_error(console: Console, message: str) -> None:
    """``error: message`` on standard error, in colour where ``console`` has it."""
    Console(stderr=True, no_color=console.no_color).print(f"[bold red]error:[/] {message}", soft_wrap=True)


@contextmanager
def reported(console: Console, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Report :data:`USER_ERRORS` (and ``also``: a command's own failures of outside tools) as
    ``error: message`` and exit with code 2."""
    try:
        yield
    except USER_ERRORS + also as e:
        report_error(console, str(e))
        raise typer.Exit(2) from None
