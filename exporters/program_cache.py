"""Programs cached by what they are a function of: (base model, runtime, quantisation, KV cache
length, slot signature), plus the versions of the tools that lowered them.

``$HYDRAOPT_PROGRAM_CACHE/<key>/`` (default ``<cache_root>/programs/<key>/``) holds the program file and ``key.json`` (what the key hashes).
An export whose key is cached gets the cached file hard-linked into its folder (copied when the
cache is on another file system), so a second bank of the same signature writes data files only.
A cache entry is written into a temporary folder and renamed into place, so a reader never sees a
half-written program; two concurrent exports of one key both lower, and the second rename loses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from hydraopt_mobile.checksum import sha256_file
from hydraopt_mobile.paths import cache_root

PROGRAM_FORMAT = 2  # bump when what a program computes or expects changes (slots, methods, inputs)
# bump a runtime's entry when only how its programs are lowered changes, so its cached programs are
# lowered again (ExecuTorch 2: forward reads the slot buffers inside XNNPACK instead of writing them back;
# onnxruntime 2: q/k/v fused and their slots stacked, exporters/onnx_fuse.py)
RUNTIME_FORMATS = {"executorch": 2, "onnxruntime": 2}
_TOOLS = ("torch", "executorch", "torchao", "onnx", "onnxruntime", "onnxscript", "transformers")


def programs_dir() -> Path:
    """Where programs are cached (the test suite points ``HYDRAOPT_PROGRAM_CACHE`` at a temporary folder)."""
    env = os.environ.get("HYDRAOPT_PROGRAM_CACHE")
    return Path(env) if env else cache_root() / "programs"


def model_fingerprint(model_dir: Path) -> str:
    """SHA-256 over the base model folder's config and weight files (names and contents)."""
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file() and (path.suffix == ".safetensors" or path.name == "config.json"):
            h.update(path.name.encode() + b"\0" + sha256_file(path).encode())
    return h.hexdigest()


def _tool_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _TOOLS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def program_key(model_dir: Path, runtime: str, quant: str, max_cache_len: int, signature: dict[str, int],
                attention: str | None = None) -> tuple[str, dict]:
    """(hex key, what it hashes) of the program for these inputs. ``attention``: the ExecuTorch
    program's attention kernels (``exporters/et_attention.py``), None for runtimes without a choice."""
    what = {
        "format": PROGRAM_FORMAT, "base_model": model_fingerprint(model_dir), "runtime": runtime, "quant": quant,
        "max_cache_len": max_cache_len, "signature": signature, "tools": _tool_versions(),
    }
    if attention is not None:
        what["attention"] = attention
    if runtime in RUNTIME_FORMATS:
        what["runtime_format"] = RUNTIME_FORMATS[runtime]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32], what


def cached_program(key: str, name: str) -> Path | None:
    """The cached program file ``name`` of ``key``, if there is one."""
    path = programs_dir() / key / name
    return path if path.is_file() else None


def store_program(key: str, what: dict, program: Path) -> None:
    """Copy ``program`` into the cache under ``key`` (atomically; an existing entry is kept)."""
    root = programs_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        shutil.copyfile(program, tmp / program.name)
        (tmp / "key.json").write_text(json.dumps(what, indent=1, sort_keys=True))
        try:
            tmp.rename(root / key)
        except OSError:  # another export stored it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def place_program(cached: Path, dest: Path) -> str:
    """Put the cached program at ``dest``: a hard link, or a copy across file systems. Returns which."""
    try:
        os.link(cached, dest)
        return "hard link"
    except OSError:
        shutil.copyfile(cached, dest)
        return "copy"


def stale_programs(unfinished_after_s: float = 24 * 3600) -> list[Path]:
    """Cache entries no export will ask for again: lowered by other tool versions or an older
    program or runtime format (their key hashes those, so no current export reaches them), or
    without a readable ``key.json``; and temporary folders of a store that stopped half-way, once
    older than ``unfinished_after_s`` (a younger one may be an export storing its program now)."""
    import time

    root = programs_dir()
    if not root.is_dir():
        return []
    tools, stale = _tool_versions(), []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            if time.time() - entry.stat().st_mtime > unfinished_after_s:
                stale.append(entry)
            continue
        try:
            what = json.loads((entry / "key.json").read_text())
        except (OSError, ValueError):
            stale.append(entry)
            continue
        current = (what.get("format") == PROGRAM_FORMAT and what.get("tools") == tools
                   and what.get("runtime_format") == RUNTIME_FORMATS.get(what.get("runtime")))
        if not current:
            stale.append(entry)
    return stale
