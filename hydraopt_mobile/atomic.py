"""The one way this tool writes an output folder: completely in a temporary place, then moved into place.

- An existing output is replaced only with ``overwrite``, only when this tool wrote it (its
  :class:`OutputKind` recognises it by its manifest or marker), and never when it is, or contains,
  an input of the same run.
- The temporary folder ``.NAME.hydraopt-tmp-XXXXXXXX`` sits beside the output with a lock file
  ``.NAME.hydraopt-tmp-XXXXXXXX.lock`` that the writing process holds (``flock``; it records the
  pid for people). A run that dies (SIGKILL, SIGTERM, power loss) leaves them behind; the next run
  that writes NAME removes them once their lock is free, so it never deletes a live run's work, and
  it never touches anything without such a lock file.
- The replaced output is first moved to ``<temporary folder>.old`` under the same lock, then removed.
- Files get the usual permissions (0666/0777 less the umask) whatever the library that wrote them
  chose (safetensors writes 0600).
- Failures to write raise :class:`OutputError` with one line naming the path.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

TMP_TAG = ".hydraopt-tmp-"
LOCK_SUFFIX = ".lock"
PENDING_SUFFIX = ".lock-pending"  # the lock file before it is locked and renamed


class OutputError(OSError):
    """An output that cannot or must not be written; the message names the path."""


class OutputExists(OutputError, FileExistsError):
    pass


@dataclass(frozen=True)
class OutputKind:
    """What a writer writes, and how to recognise one it wrote earlier (for ``--overwrite``)."""

    what: str  # "bundle", "PEFT adapter folder", ...
    marker: str  # how it is recognised, for the refusal message
    recognise: Callable[[Path], bool]


def json_marker(what: str, file: str, key: str, prefix: str) -> OutputKind:
    """An output recognised by ``file``, a JSON object whose ``key`` starts with ``prefix``."""

    def recognise(folder: Path) -> bool:
        path = folder / file
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 26:
            return False
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, RecursionError, OSError):
            return False
        return isinstance(data, dict) and isinstance(data.get(key), str) and data[key].startswith(prefix)

    return OutputKind(what, f"{file} with {key} {prefix!r}", recognise)


def check_output(out: Path, overwrite: bool, kind: OutputKind, inputs: Iterable[Path] = ()) -> None:
    """Refuse ``out`` when it is (or contains) an input of this run, or exists and may not be replaced."""
    out = Path(out)
    target = out.resolve()
    for src in inputs:
        resolved = Path(src).resolve()
        if resolved == target or target in resolved.parents:
            relation = "is" if resolved == target else "contains"
            raise OutputError(f"--out {out}: {relation} {src}, an input of this run; choose another output folder")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise OutputExists(f"{out}: already exists; pass --overwrite to replace it")
    if out.is_symlink() or not out.is_dir() or not kind.recognise(out):
        raise OutputExists(
            f"{out}: exists and is not a {kind.what} written by hydraopt (no {kind.marker}); "
            "--overwrite replaces only this tool's own outputs: remove it yourself or choose another --out"
        )


def remove_stale(out: Path) -> list[Path]:
    """Remove this tool's temporary folders beside ``out`` whose writer is gone (lock free)."""
    removed = []
    prefix = f".{glob.escape(Path(out).name)}{TMP_TAG}*"
    for lock in [*Path(out).parent.glob(prefix + LOCK_SUFFIX), *Path(out).parent.glob(prefix + PENDING_SUFFIX)]:
        if lock.is_symlink() or not lock.is_file():
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live run holds it
            os.close(fd)
            continue
        try:
            folder = lock.with_name(lock.name.removesuffix(LOCK_SUFFIX).removesuffix(PENDING_SUFFIX))
            for path in (folder, folder.with_name(folder.name + ".old")):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normalise_modes(root: Path, umask: int) -> None:
    """Usual permissions for everything under ``root`` (libraries may create files 0600)."""
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~umask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def _locked_temp(out: Path) -> tuple[Path, int]:
    """A new temporary folder beside ``out`` and the fd holding its lock (taken before the lock
    file gets its final name, so no other run ever sees it unlocked)."""
    for _ in range(100):
        folder = out.parent / f".{out.name}{TMP_TAG}{secrets.token_hex(4)}"
        lock = folder.with_name(folder.name + LOCK_SUFFIX)
        if os.path.lexists(folder) or os.path.lexists(lock):
            continue
        pending = folder.with_name(folder.name + PENDING_SUFFIX)
        fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.rename(pending, lock)
            folder.mkdir()
        except BaseException:
            os.close(fd)
            pending.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            raise
        return folder, fd
    raise OutputError(f"{out.parent}: cannot find a free temporary name")


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False, *, kind: OutputKind, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on error it is removed.

    Everything the caller writes must go inside the yielded folder (use :func:`paths.confined` for
    names that come from outside). ``inputs`` are the paths this run reads.
    """
    out = Path(out)
    check_output(out, overwrite, kind, inputs)
    umask = _umask()
    blocking = next((p for p in [out.parent, *out.parent.parents] if os.path.lexists(p) and not p.is_dir()), None)
    if blocking is not None:
        raise OutputError(f"--out {out}: {blocking} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        tmp, fd = _locked_temp(out)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"{out}: cannot write beside it in {out.parent} ({e.strerror or e})") from e
    lock = tmp.with_name(tmp.name + LOCK_SUFFIX)
    old = tmp.with_name(tmp.name + ".old")
    try:
        try:
            yield tmp
            _normalise_modes(tmp, umask)
            check_output(out, overwrite, kind, inputs)  # again: another run may have written it meanwhile
            if os.path.lexists(out):
                out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                if os.path.lexists(old):
                    old.rename(out)
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OutputError:
        raise
    except OSError as e:
        if e.filename is not None and any(_within(Path(e.filename), p) for p in (tmp, old, out)):
            raise OutputError(f"{e.filename}: cannot write ({e.strerror or e})") from e
        raise
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path`` in one
    rename, otherwise it is removed. For files rewritten in place by design (results, caches): no
    ``--overwrite`` rules apply. The temporary name is unique, so concurrent writers never share it,
    and ends in ``path``'s suffix, for writers that choose the format by it (matplotlib)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_TAG}{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write one text file through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
