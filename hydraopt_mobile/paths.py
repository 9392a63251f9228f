"""Names and relative paths that come from outside: task names, and file entries of manifests.

Task names become file names (``tasks/<task>.safetensors``) in bundles and exports, which travel to
other machines and file systems, so they are limited to a portable character set:
letters, digits, ``_``, ``-`` and ``.``; starting with a letter or digit; at most 64 characters;
no ``..``, no trailing ``.``. Two names that differ only in case are the same file on macOS and
Windows, so a set of tasks must be unique ignoring case.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

# Also in schemas/*.schema.json (tests check that they agree); Python and ECMA regexes read it alike.
TASK_NAME_PATTERN = r"^(?!.*\.\.)(?!.*\.$)[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TASK_NAME_RULE = "letters, digits, '_', '-' and '.', starting with a letter or digit, at most 64 characters, no '..', not ending in '.'"
_TASK_NAME = re.compile(TASK_NAME_PATTERN)
# Module names end up in file names (analysis heatmaps) and graph input names: PyTorch attribute
# paths only (identifiers and indices separated by dots). Also in bundle-manifest.schema.json.
MODULE_NAME_PATTERN = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"


def task_name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid task name, or None when it is."""
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        return f"task name {name!r} is not allowed: use {TASK_NAME_RULE}"
    return None


def duplicate_ignoring_case(names: list[str]) -> tuple[str, str] | None:
    """The first two names that are equal ignoring case, or None."""
    seen: dict[str, str] = {}
    for name in names:
        key = name.casefold()
        if key in seen:
            return seen[key], name
        seen[key] = name
    return None


def confined(root: Path, rel: object, error: type[Exception]) -> Path:
    """``root / rel`` once it is certain to stay inside ``root``: ``rel`` is a relative POSIX path
    without ``..``, and after resolving symlinks it still lies inside ``root``. Raises ``error``
    naming the folder and the path otherwise."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise error(f"{root}: file entry {rel!r} is not a relative POSIX path")
    pure = PurePosixPath(rel)
    if not pure.parts or pure.is_absolute() or ".." in pure.parts:
        raise error(f"{root}: file entry {rel!r} points outside the folder (absolute path or '..')")
    path = Path(root) / pure
    try:
        inside = path.resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise error(f"{root}: file entry {rel!r} cannot be resolved ({e})") from e
    if not inside:
        raise error(f"{root}: file entry {rel!r} leads outside the folder through a symlink")
    return path


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$HYDRAOPT_CACHE``, else ``~/.cache/hydraopt-mobile``: the project cache
    (converted base model, decoded answers, exported programs)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("HYDRAOPT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hydraopt-mobile"
