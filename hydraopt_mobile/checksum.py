"""SHA-256 of files and the one check that a file is the one a manifest listed (bundles and exports).

The check is in one place so that every reader refuses the same things in the same order: a missing
file, then a wrong size (cheap, and says "truncated"), then a wrong digest (reads the whole file).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class Mismatch:
    """Why a file is not the listed one: ``missing``, ``size`` (``found`` = its bytes) or
    ``sha256`` (``found`` = its digest)."""

    kind: Literal["missing", "size", "sha256"]
    found: int | str | None = None


def read_listed(path: Path, size: int, sha256: str) -> bytes | Mismatch:
    """The bytes of ``path`` when it is the listed file, else what differs (as :func:`mismatch`).

    The file is read once and the digest is of the bytes returned, so nothing can change between
    the check and the use; for small files that are read anyway (a task's factors)."""
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                return Mismatch("missing")
            if info.st_size != size:
                return Mismatch("size", info.st_size)
            blob = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return Mismatch("missing")
    digest = hashlib.sha256(blob).hexdigest()
    return blob if digest == sha256 else Mismatch("sha256", digest)


def mismatch(path: Path, size: int, sha256: str) -> Mismatch | None:
    """None when ``path`` is a file of ``size`` bytes whose SHA-256 is ``sha256``; else what differs."""
    if not path.is_file():
        return Mismatch("missing")
    found = path.stat().st_size
    if found != size:
        return Mismatch("size", found)
    digest = sha256_file(path)
    return None if digest == sha256 else Mismatch("sha256", digest)
