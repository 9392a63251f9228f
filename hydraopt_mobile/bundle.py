"""The bundle: a merged bank on disk.

    BUNDLE/manifest.json          versioned manifest (tasks, modules, layouts, formats, sha256 of files)
    BUNDLE/shared.safetensors     factors used by two or more tasks (resident on a device)
    BUNDLE/tasks/<task>.safetensors  factors used by that task alone (switched with the task)

Tensor keys are ``<module>/A<i>/<part>`` and ``<module>/B<i>/<part>``; ``part`` is ``w`` (fp16) or
``q`` + ``scale`` (int8 / int4, see formats.py). B factors are stored as their columns (B^T).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir
from .bank import MergedBank, MergedModule
from .formats import NumberFormat, StoredFactor

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARED = "shared.safetensors"


class BundleError(ValueError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _task_file(task: str) -> str:
    return f"tasks/{task}.safetensors"


def _owner(users: set[int], tasks: list[str]) -> str:
    return SHARED if len(users) > 1 else _task_file(tasks[next(iter(users))])


def write_bundle(bank: MergedBank, out: Path, overwrite: bool = False) -> Path:
    """Write ``bank`` to ``out`` (temporary folder, renamed into place when complete)."""
    files: dict[str, dict[str, torch.Tensor]] = {SHARED: {}}
    files.update({_task_file(t): {} for t in bank.tasks})
    modules = {}
    for name, m in bank.modules.items():
        entry = {"shape": list(m.shape), "a_index": m.a_index, "b_index": m.b_index, "A": [], "B": []}
        for kind, factors, index in (("A", m.A, m.a_index), ("B", m.B, m.b_index)):
            for i, f in enumerate(factors):
                users = {t for t, g in enumerate(index) if g == i}
                file = _owner(users, bank.tasks)
                for part, tensor in f.data.items():
                    files[file][f"{name}/{kind}{i}/{part}"] = tensor.contiguous()
                entry[kind].append({"file": file, "shape": list(f.shape), "format": f.fmt.label(), "bytes": f.nbytes()})
        modules[name] = entry
    with atomic_dir(Path(out), overwrite) as tmp:
        (tmp / "tasks").mkdir()
        for rel, tensors in files.items():
            save_file(tensors, str(tmp / rel), metadata={"hydraopt_bundle": str(FORMAT_VERSION)})
        manifest = {
            "format": "hydraopt-bundle",
            "version": FORMAT_VERSION,
            "method": bank.method,
            "params": bank.params,
            "tasks": bank.tasks,
            "fingerprint": bank.fingerprint,
            "reference_fp16_bytes": bank.reference_fp16_bytes,
            "payload_bytes": bank.payload_bytes(),
            "rel_errors": bank.rel_errors,
            "files": {rel: {"bytes": (tmp / rel).stat().st_size, "sha256": sha256_file(tmp / rel)} for rel in files},
            "modules": modules,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
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
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for rel in manifest["files"]:
        try:
            tensors[rel] = load_file(str(path / rel))
        except (SafetensorError, OSError) as e:
            raise BundleError(f"{path / rel}: unreadable safetensors ({e})") from e
    modules = {}
    for name, entry in manifest["modules"].items():
        factors: dict[str, list[StoredFactor]] = {"A": [], "B": []}
        for kind in ("A", "B"):
            for i, info in enumerate(entry[kind]):
                prefix = f"{name}/{kind}{i}/"
                data = {k[len(prefix):]: v for k, v in tensors[info["file"]].items() if k.startswith(prefix)}
                if not data:
                    raise BundleError(f"{path / info['file']}: tensor {prefix}* missing")
                factors[kind].append(StoredFactor(NumberFormat.parse(info["format"]), data, tuple(info["shape"]), kind == "B"))
        modules[name] = MergedModule(tuple(entry["shape"]), entry["a_index"], entry["b_index"], factors["A"], factors["B"])
    return MergedBank(
        tasks=manifest["tasks"],
        modules=modules,
        method=manifest["method"],
        params=manifest["params"],
        fingerprint=manifest["fingerprint"],
        reference_fp16_bytes=manifest["reference_fp16_bytes"],
        rel_errors=manifest.get("rel_errors", {}),
    )


def bundle_file_bytes(path: Path, manifest: dict) -> dict[str, int]:
    """Exact on-disk sizes: shared file, each task file, manifest, total."""
    sizes = {rel: (Path(path) / rel).stat().st_size for rel in manifest["files"]}
    sizes[MANIFEST] = (Path(path) / MANIFEST).stat().st_size
    return sizes
