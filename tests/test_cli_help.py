"""The command listings read as one line per command: typer lists a command by the first paragraph of
its help and keeps that paragraph's line breaks, so a summary wrapped in the docstring showed up cut
mid-sentence ("error of a bundle; for an" / "export, its program ...")."""

from __future__ import annotations

import inspect

import typer

from hydraopt_mobile.app.cli import app


def _commands(cmd, path: tuple[str, ...] = ()):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_command_has_a_one_line_summary() -> None:
    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) > 15  # the walk reached the subgroups
    for path, cmd in commands[1:]:
        summary = inspect.cleandoc(cmd.help or "").split("\n\n")[0]
        assert summary and "\n" not in summary, f"hydraopt {' '.join(path)}: summary {summary!r}"


def test_every_option_and_argument_says_what_it_is() -> None:
    """A user reads ``--help`` to learn what ``--overwrite`` replaces or what ``--seed`` seeds; an
    option listed with its type only (``--overwrite <bool>``) says neither."""
    undocumented = [
        f"hydraopt {' '.join(path)} {param.opts[0] if param.param_type_name == 'option' else param.name}"
        for path, cmd in _commands(typer.main.get_command(app))
        for param in getattr(cmd, "params", [])
        if param.name != "help" and not (getattr(param, "help", None) or "").strip()
    ]
    assert undocumented == []
