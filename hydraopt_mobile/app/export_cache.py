"""Exports kept in the model cache, keyed by what they are made of, and linked into an output
folder instead of copied (a 500 MB export is then stored once)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from hydraopt_mobile.errors import UserError
from hydraopt_mobile.paths import cache_root

if TYPE_CHECKING:  # the bank module imports torch; `hydraopt cache` reads this module's folders without it
    from hydraopt_mobile.bank import MergedBank


def cached_export(bank: MergedBank, model_dir: Path, fmt: str, quant: str, console: Console) -> Path:
    """The export of ``bank`` in the cache, made on the first run: keyed by the bank's digest, the
    base model's files (name, size, mtime), the format and the export schema, so anything that
    changes them re-exports. A cached export whose manifest this version cannot read (written by
    an older exporter under the same key) is made again, never handed on to a runtime that refuses it."""
    from exporters.export import bank_digest, export_bank
    from exporters.manifest import SCHEMA, Manifest

    model_files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir() if p.is_file())
    key = hashlib.sha256(json.dumps([bank_digest(bank), model_files, fmt, quant, SCHEMA]).encode()).hexdigest()[:16]
    folder = exports_dir() / f"{fmt}-{quant}-{bank.method}-{key}"
    try:
        Manifest.read(folder)
        readable = True
    except (UserError, OSError):
        readable = False
    if readable:
        console.print(f"export: cached {folder}")
    else:
        export_bank(bank, model_dir, fmt, quant, folder, overwrite=True)  # type: ignore[arg-type]
    return folder


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` into ``dst`` (copy across file systems). A file edited
    through either name changes both; the manifest's sha256 check refuses such a file before it
    is loaded."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def exports_dir() -> Path:
    return cache_root() / "exports"


def stale_exports() -> list[Path]:
    """Cached exports this version cannot read (an older export schema): :func:`cached_export`
    would make them again under the same key, so their bytes serve nothing until then."""
    from exporters.manifest import Manifest

    folder = exports_dir()
    stale = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            Manifest.read(entry)
        except (UserError, OSError):
            stale.append(entry)
    return stale
