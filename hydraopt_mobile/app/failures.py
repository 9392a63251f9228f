"""Which errors the command line reports as one line (exit code 2) instead of a traceback: bad
input (:class:`UserError`, whose message names the file or option at fault) and files that cannot
be read or written (``OSError``). Anything else is a bug and keeps its traceback."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console

from hydraopt_mobile.errors import UserError

USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)


@contextmanager
def reported(console: Console, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Report :data:`USER_ERRORS` (and ``also``: a command's own failures of outside tools) as
    ``error: message`` and exit with code 2."""
    try:
        yield
    except USER_ERRORS + also as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        raise typer.Exit(2) from None
