"""The library reports progress through ``on_step(done, total)`` callbacks; the application draws
them as a rich progress bar, on a terminal only: a transient bar drawn into a pipe or a log file
leaves an empty line behind (rich), and a log wants the results, not the bars."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from rich import get_console
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:  # the merge package imports torch; drawing a bar needs none
    from hydraopt_mobile.merge.method import OnStep


@contextmanager
def progress_bar(description: str, console: Console | None = None) -> Iterator[OnStep]:
    """A transient bar, and the ``on_step`` callback that advances it (each call's total may differ:
    one bar can follow several merges in turn)."""
    console = console or get_console()
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        yield advancing(bar, bar.add_task(description, total=None))


def advancing(bar: Progress, task: TaskID) -> OnStep:
    """The ``on_step(done, total)`` callback that moves ``task`` of ``bar`` (each call's total may differ)."""

    def on_step(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return on_step


def appearing(bar: Progress, description: str) -> OnStep:
    """As :func:`advancing`, for a later stage of one command: its bar is added at its first step,
    so it is not drawn empty while the stages before it run."""
    task: list[TaskID] = []

    def on_step(done: int, total: int) -> None:
        if not task:
            task.append(bar.add_task(description, total=total))
        bar.update(task[0], completed=done, total=total)

    return on_step


def stderr_progress(disable: bool = False) -> Progress:
    """Transient bars (description, bar, done/total, elapsed) on stderr, for the commands that print
    their result on stdout (``--json``): stdout then holds the result alone."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=disable or not console.is_terminal)
