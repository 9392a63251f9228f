"""The one writer of result records: JSON, a Markdown report of tables, and optionally a plot, each
replaced atomically (a reader never sees half a file; a failed run leaves the previous one).

Tables are rows of cells: a cell that is already a string is written as it is, anything else goes
through :func:`cell` (``-`` for None, 4 significant digits for floats). The same figures printed
on the console go through :func:`print_unwrapped`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from hydraopt_mobile.atomic import atomic_file, write_text_atomic
from hydraopt_mobile.errors import UserError


def cell(value: Any) -> str:
    """A table cell: ``-`` for None, 4 significant digits for floats below 10^4, whole numbers above."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _line(cells: Iterable[Any]) -> str:
    return "|" + "|".join(f" {c} " if c != "" else " " for c in (c if isinstance(c, str) else cell(c) for c in cells)) + "|"


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """The lines of a Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default all ``l``)."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in (align or "l" * len(columns)))
    return [_line(columns), rule, *(_line(row) for row in rows)]


def print_unwrapped(table: Table, console: Console) -> None:
    """``table`` as wide as its content: not wrapped at the terminal's (or a pipe's 80) columns."""
    for column in table.columns:
        column.no_wrap = True
    width = Measurement.get(console, console.options.update(width=1_000), table).maximum
    Console(file=console.file, width=width, force_terminal=console.is_terminal, no_color=console.no_color, quiet=console.quiet).print(table)


def dict_table(records: Iterable[dict], columns: Sequence[str]) -> list[str]:
    """A table of ``records`` with one column per key (missing keys are ``-``)."""
    return markdown_table(columns, ([r.get(c) for c in columns] for r in records))


OUT_HELP = "write OUT (the JSON record) and beside it OUT with .md and .png"


def refuse_existing(out: Path | None, overwrite: bool) -> None:
    """A report is never replaced silently: ``out`` or a report beside it (:func:`write_record`'s
    ``.md`` and ``.png``) existing needs ``--overwrite``; checked before any work starts."""
    if out is not None and not overwrite and (existing := [p for p in (out, out.with_suffix(".md"), out.with_suffix(".png")) if p.exists()]):
        raise UserError(f"{existing[0]}: already exists; pass --overwrite to replace it")


def write_record(path: Path, data: Any, markdown: str | None = None, plot: Callable[[Path], None] | None = None, *, indent: int = 1, trailing_newline: bool = False) -> None:
    """``path`` (JSON), and beside it ``.md`` (``markdown``) and ``.png`` (``plot(tmp_png)``) when given."""
    path = Path(path)
    write_text_atomic(path, json.dumps(data, indent=indent) + ("\n" if trailing_newline else ""))
    if markdown is not None:
        write_text_atomic(path.with_suffix(".md"), markdown)
    if plot is not None:
        with atomic_file(path.with_suffix(".png")) as tmp:
            plot(tmp)
