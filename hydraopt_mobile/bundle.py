"""The bundle: a merged bank on disk.

    BUNDLE/manifest.json             versioned, compact manifest (tasks, modules, layouts, formats,
                                     sha256 and bytes of every file, storage in file bytes)
    BUNDLE/shared.safetensors        factors used by two or more tasks (resident on a device)
    BUNDLE/tasks/<task>.safetensors  factors used by that task alone (switched with the task)

Tensor keys follow storage.py (``<module index>.<A|B><i>.<part>`` in the shared file,
``<module index>.<A|B>.<part>`` in a task's file); ``part`` is ``w`` (fp16) or ``q`` + ``scale``
(int8 / int4, see formats.py). B factors are stored as their columns (B^T). A file that would hold
no tensor is not written. The manifest does not repeat per-factor facts: modules with the same
(format, ranks, task -> factor indices) share one ``layouts`` entry, and which file holds a factor
follows from how many tasks use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir, json_marker
from .bank import SHARED, MergedBank, MergedModule, task_file
from .formats import NumberFormat, StoredFactor
from .storage import FILE_METADATA, factor_key

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
BUNDLE = json_marker("bundle", MANIFEST, "format", "hydraopt-bundle")


class BundleError(ValueError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _layout_entry(m: MergedModule) -> dict:
    return {
        "format": m.A[0].fmt.label() if m.A else "fp16",
        "a_ranks": [f.shape[0] for f in m.A],
        "b_ranks": [f.shape[1] for f in m.B],
        "a_index": m.a_index,
        "b_index": m.b_index,
    }


def manifest_for(bank: MergedBank, files: dict[str, dict]) -> dict:
    """The compact manifest of ``bank`` whose tensor files are ``files`` (rel path -> bytes, sha256)."""
    layouts: list[dict] = []
    modules = []
    for name, m in bank.modules.items():
        entry = _layout_entry(m)
        if entry not in layouts:
            layouts.append(entry)
        modules.append([name, m.shape[0], m.shape[1], layouts.index(entry)])
    file_bytes = sum(f["bytes"] for f in files.values())
    return {
        "format": "hydraopt-bundle",
        "version": FORMAT_VERSION,
        "method": bank.method,
        "params": bank.params,
        "tasks": bank.tasks,
        "base_model": bank.fingerprint.get("base_model"),
        "file_bytes": file_bytes,
        "reference_file_bytes": bank.reference_file_bytes,
        "storage_fraction": file_bytes / bank.reference_file_bytes if bank.reference_file_bytes else None,
        "payload_bytes": bank.payload_bytes(),
        "reference_payload_bytes": bank.reference_payload_bytes,
        "rel_errors": bank.rel_errors,
        "files": files,
        "layouts": layouts,
        "modules": modules,
    }


def write_bundle(bank: MergedBank, out: Path, overwrite: bool = False, inputs: Iterable[Path] = ()) -> Path:
    """Write ``bank`` to ``out`` (temporary folder, renamed into place when complete); ``inputs``:
    the paths this run read, which ``out`` may not replace."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for file, part, _ in bank.packed():
        tensors.setdefault(file, {}).update(part)
    with atomic_dir(Path(out), overwrite, kind=BUNDLE, inputs=inputs) as tmp:
        (tmp / "tasks").mkdir()
        files = {}
        for rel, data in tensors.items():
            save_file(data, str(tmp / rel), metadata=FILE_METADATA)
            files[rel] = {"bytes": (tmp / rel).stat().st_size, "sha256": sha256_file(tmp / rel)}
        (tmp / MANIFEST).write_text(json.dumps(manifest_for(bank, files), separators=(",", ":")))
    return Path(out)


def read_manifest(path: Path) -> dict:
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing; {path} is not a bundle")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from e
    if manifest.get("format") != "hydraopt-bundle" or manifest.get("version") != FORMAT_VERSION:
        raise BundleError(f"{mpath}: not a version-{FORMAT_VERSION} hydraopt bundle manifest")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Refuse any file whose size or sha256 differs from the manifest."""
    for rel, info in manifest["files"].items():
        f = Path(path) / rel
        if not f.is_file():
            raise BundleError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise BundleError(f"{f}: checksum mismatch with {MANIFEST} (file changed or corrupt)")


def load_bundle(path: str | Path) -> MergedBank:
    """Read a bundle, verifying every file's checksum first."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    tensors: dict[str, torch.Tensor] = {}
    for rel in manifest["files"]:
        try:
            tensors.update({f"{rel}:{k}": v for k, v in load_file(str(path / rel)).items()})
        except (SafetensorError, OSError) as e:
            raise BundleError(f"{path / rel}: unreadable safetensors ({e})") from e
    tasks = manifest["tasks"]
    modules = {}
    for m, (name, d_out, d_in, layout_id) in enumerate(manifest["modules"]):
        layout = manifest["layouts"][layout_id]
        fmt = NumberFormat.parse(layout["format"])
        module = MergedModule((d_out, d_in), list(layout["a_index"]), list(layout["b_index"]), [], [])
        for kind, ranks, length in (("A", layout["a_ranks"], d_in), ("B", layout["b_ranks"], d_out)):
            for i, rank in enumerate(ranks):
                users = module.users(kind, i)
                rel, index = (task_file(tasks[users[0]]), None) if len(users) == 1 else (SHARED, i)
                data = {part: torch.zeros(shape, dtype=dtype) for part, (dtype, shape) in fmt.encoded_shapes(rank, length).items()}
                for part in data if rank else ():
                    key = f"{rel}:{factor_key(m, kind, index, part)}"
                    if key not in tensors:
                        raise BundleError(f"{path / rel}: tensor {factor_key(m, kind, index, part)} ({name}) missing")
                    data[part] = tensors[key]
                shape = (rank, d_in) if kind == "A" else (d_out, rank)
                (module.A if kind == "A" else module.B).append(StoredFactor(fmt, data, shape, kind == "B"))
        modules[name] = module
    return MergedBank(
        tasks=tasks,
        modules=modules,
        method=manifest["method"],
        params=manifest["params"],
        fingerprint={"base_model": manifest["base_model"], "module_shapes": {name: [o, i] for name, o, i, _ in manifest["modules"]}},
        reference_file_bytes=manifest["reference_file_bytes"],
        reference_payload_bytes=manifest["reference_payload_bytes"],
        rel_errors=manifest.get("rel_errors", {}),
    )
