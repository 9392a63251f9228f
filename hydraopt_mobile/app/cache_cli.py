"""``hydraopt cache``: what the project cache holds and how many bytes each part takes on disk;
``cache prune`` removes what no run can use again; ``cache clear PART...`` removes whole parts.

The cache grows without bound otherwise: every lowered program (0.2-0.55 GB for SmolLM2-135M) stays
under its key, and a key hashes the lowering tools' versions, so after an upgrade the old programs
are never asked for again. Everything in it is made again on first use; a part is removed by first
renaming it aside, so a run that stops half-way leaves no half-deleted part under its own name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from exporters.program_cache import programs_dir, stale_programs
from exporters.targets.target import targets_root
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.paths import cache_root

from .export_cache import exports_dir, stale_exports
from .failures import reported

console = Console(soft_wrap=True)
cache_app = typer.Typer(help="The project cache: what it holds and its size; prune what no run uses again; clear parts.",
                        invoke_without_command=True)


@dataclass(frozen=True)
class Part:
    name: str
    holds: str
    folder: Callable[[], Path]
    stale: Callable[[], list[Path]] = lambda: []  # entries no run can use again


PARTS: dict[str, Part] = {p.name: p for p in (
    Part("models", "the base model converted from its PyPI package", lambda: cache_root() / "models"),
    Part("programs", "lowered programs by signature; an export of a cached signature links one", programs_dir, stale_programs),
    Part("exports", "the demo's exports", exports_dir, stale_exports),
    Part("answers", "the demo's decoded answers", lambda: cache_root() / "answers"),
    Part("adapters", "suite adapters trained with other settings (demo --train-lr)", lambda: cache_root() / "adapters"),
    Part("targets", "device targets' set-ups (hydraopt targets setup NAME)", targets_root),
    Part("android", "the Android build tools and the app's runtime (hydraopt android build)", lambda: cache_root() / "android"),
)}


def _bytes(paths: list[Path], seen: set[tuple[int, int]]) -> int:
    """Bytes on disk under ``paths``, each file counted once (``seen``: the (device, inode) pairs
    already counted: a program hard-linked into an export counts in the first part listed)."""
    total = 0
    for path in paths:
        if not path.exists():
            continue
        for root, _, files in os.walk(path) if path.is_dir() else [(str(path.parent), [], [path.name])]:
            for name in files:
                try:
                    st = os.lstat(os.path.join(root, name))
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def _remove(path: Path) -> None:
    """Rename ``path`` aside in its folder, then delete it."""
    aside = Path(tempfile.mkdtemp(prefix=".removing-", dir=path.parent))
    path.rename(aside / path.name)
    shutil.rmtree(aside)


def cache_report() -> list[dict]:
    """Per part: name, what it holds, folder, entries, bytes, stale entries and their bytes."""
    seen: set[tuple[int, int]] = set()
    rows = []
    for part in PARTS.values():
        folder = part.folder()
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
        stale = part.stale() if entries else []
        stale_bytes = _bytes(stale, set(seen))
        rows.append({"part": part.name, "holds": part.holds, "folder": str(folder), "entries": len(entries),
                     "bytes": _bytes([folder], seen), "stale_entries": len(stale), "stale_bytes": stale_bytes})
    return rows


@cache_app.callback()
def show(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="print the report as JSON")) -> None:
    """What each part of the cache holds and the bytes it takes on disk, with what `prune` would free."""
    if ctx.invoked_subcommand is not None:
        return
    rows = cache_report()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("part", "holds", "entries", "MB on disk", "stale (prune)", title=f"cache: {cache_root()}")
    for r in rows:
        stale = f"{r['stale_entries']} ({r['stale_bytes'] / 1e6:,.0f} MB)" if r["stale_entries"] else "-"
        table.add_row(r["part"], r["holds"], str(r["entries"]), f"{r['bytes'] / 1e6:,.0f}", stale)
    console.print(table)
    console.print("a file linked into several parts counts once, in the first; `hydraopt cache prune` removes the stale entries, "
                  "`hydraopt cache clear PART` a whole part (made again on first use)")


@cache_app.command()
def prune() -> None:
    """Remove what no run can use again.

    That is: programs lowered by other tool versions or formats, stores that stopped half-way a
    day or more ago, exports this version cannot read."""
    freed = 0
    for part in PARTS.values():
        for entry in part.stale():
            freed += _bytes([entry], set())
            _remove(entry)
            console.print(f"removed {entry}")
    console.print(f"freed {freed / 1e6:,.0f} MB")


@cache_app.command()
def clear(
    parts: Optional[list[str]] = typer.Argument(None, help=f"parts to remove: {', '.join(PARTS)}"),
    all_parts: bool = typer.Option(False, "--all", help="remove every part"),
) -> None:
    """Remove whole parts of the cache (each is made again on first use: targets and android by their set-up)."""
    with reported(console):
        if all_parts == bool(parts):
            raise UserError(f"name the parts to clear ({', '.join(PARTS)}) or pass --all")
        names = list(PARTS) if all_parts else list(parts or [])
        if unknown := [n for n in names if n not in PARTS]:
            raise UserError(f"no cache part {', '.join(map(repr, unknown))}; the parts: {', '.join(PARTS)}")
        for name in names:
            folder = PARTS[name].folder()
            if not folder.exists():
                console.print(f"{name}: already empty")
                continue
            freed = _bytes([folder], set())
            _remove(folder)
            console.print(f"{name}: removed {folder} ({freed / 1e6:,.0f} MB)")
