"""The library reports progress through ``on_step(done, total)`` callbacks; the application draws
them as a rich progress bar."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import Progress

from hydraopt_mobile.merge.method import OnStep


@contextmanager
def progress_bar(description: str, console: Console | None = None) -> Iterator[OnStep]:
    """A transient bar, and the ``on_step`` callback that advances it (each call's total may differ:
    one bar can follow several merges in turn)."""
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def on_step(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield on_step
