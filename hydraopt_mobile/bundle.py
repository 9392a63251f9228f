"""The bundle: a merged bank on disk.

    BUNDLE/manifest.json             versioned, compact manifest (tasks, modules, layouts, formats,
                                     sha256 and bytes of every file, storage in file bytes)
    BUNDLE/shared.safetensors        factors used by two or more tasks (resident on a device)
    BUNDLE/tasks/<task>.safetensors  factors used by that task alone (switched with the task)

Each tensor file (format 3, storage.py) is one safetensors tensor ``data``: the file's factor parts
back to back, named ``<module index>.<A|B><i>.<part>`` in the shared file and
``<module index>.<A|B>.<part>`` in a task's file, in storage.file_order, their dtypes and shapes
following from the manifest's layouts; ``part`` is ``w`` (fp16) or ``q`` + ``scale`` (int8 / int4,
see formats.py). B factors are stored as their columns (B^T). A file that would hold no part is not
written. The manifest does not repeat per-factor facts: modules with the same
(format, ranks, task -> factor indices) share one ``layouts`` entry, and which file holds a factor
follows from how many tasks use it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hydraopt_mobile.atomic import atomic_dir, json_marker
from hydraopt_mobile.bank import MergedBank, MergedModule, factor_file, packed_module
from hydraopt_mobile.checksum import mismatch, sha256_file
from hydraopt_mobile.formats import NumberFormat, StoredFactor
from hydraopt_mobile.paths import confined, duplicate_ignoring_case, task_name_problem
from hydraopt_mobile.schemas import read_document
from hydraopt_mobile.storage import BLOB, FILE_METADATA, TensorSpec, factor_key, file_order, header_bytes
from hydraopt_mobile.errors import UserError

FORMAT_VERSION = 3  # 3: one flat blob per file (storage.py); 2 gave every part its own header entry
MANIFEST = "manifest.json"
BUNDLE = json_marker("bundle", MANIFEST, "format", "hydraopt-bundle")


class BundleError(UserError):
    pass


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


def sorted_tasks(bank: MergedBank) -> MergedBank:
    """``bank`` with its tasks in sorted order (factor indices permuted alike). A bundle keeps its
    tasks sorted, so a reader can tell a reordered task list, which would otherwise silently attach
    shared factors to the wrong tasks, from the written one."""
    order = sorted(range(len(bank.tasks)), key=lambda t: bank.tasks[t])
    if order == list(range(len(order))):
        return bank
    modules = {
        name: replace(m, a_index=[m.a_index[t] for t in order], b_index=[m.b_index[t] for t in order])
        for name, m in bank.modules.items()
    }
    return replace(bank, tasks=[bank.tasks[t] for t in order], modules=modules)


def write_bundle(bank: MergedBank, out: Path, overwrite: bool = False, inputs: Iterable[Path] = (), unchanged: dict[str, dict] | None = None) -> Path:
    """Write ``bank`` to ``out`` (temporary folder, renamed into place when complete); ``inputs``:
    the paths this run read, which ``out`` may not replace. Tasks are written in sorted order.
    ``unchanged``: files (a manifest's ``files``: rel path -> bytes, sha256) that the new bundle must
    hold with exactly those bytes; checked before the folder is moved into place."""
    with atomic_dir(Path(out), overwrite, kind=BUNDLE, inputs=inputs) as tmp:
        files = write_bundle_files(bank, tmp)["files"]
        changed = sorted(rel for rel, info in (unchanged or {}).items() if files.get(rel) != info)
        if changed:
            raise AssertionError(f"{out}: would change existing files {changed}, which must stay byte-identical; nothing was written")
    return Path(out)


def write_bundle_files(bank: MergedBank, folder: Path) -> dict:
    """Write ``bank``'s tensor files and manifest into the existing empty ``folder`` (tasks sorted);
    returns the manifest. The exporters call this for an export's ``bank/`` folder."""
    for task in bank.tasks:
        problem = task_name_problem(task)
        if problem:
            raise BundleError(f"{folder}: {problem}")
    bank = sorted_tasks(bank)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    specs: dict[str, list[TensorSpec]] = {}
    for file, part, file_specs in bank.packed():
        tensors.setdefault(file, {}).update(part)
        specs.setdefault(file, []).extend(file_specs)
    (folder / "tasks").mkdir()
    files = {}
    for rel, data in tensors.items():
        path = confined(folder, rel, BundleError)
        blob = torch.cat([data[s.key].reshape(-1).view(torch.uint8) for s in file_order(specs[rel])])
        save_file({BLOB: blob}, str(path), metadata=FILE_METADATA)
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = manifest_for(bank, files)
    (folder / MANIFEST).write_text(json.dumps(manifest, separators=(",", ":")))
    return manifest


class BundleWriter:
    """A bundle written module by module, so a merge never holds a whole bank's tensors.

    :meth:`add` writes one module's parts to a spill file per bundle file (in the temporary
    folder) and returns the module without them; :meth:`finish` writes every tensor file (its
    blob's header, storage.header_bytes, then the parts copied from the spill in
    storage.file_order) and the manifest. The files are byte for byte what :func:`write_bundle`
    writes for the same bank (tests: ``test_streamed_merge_writes_the_same_bundle``)."""

    def __init__(self, folder: Path, tasks: list[str]):
        for task in tasks:
            problem = task_name_problem(task)
            if problem:
                raise BundleError(f"{folder}: {problem}")
        self.folder, self.tasks = Path(folder), tasks
        self._order = sorted(range(len(tasks)), key=lambda t: tasks[t])
        self._spill = self.folder / ".spill"
        self._spill.mkdir()
        self._entries: dict[str, list[tuple[TensorSpec, int]]] = {}  # file -> (spec, offset in its spill)
        self._sizes: dict[str, int] = {}
        self._spill_ids: dict[str, int] = {}
        self._count = 0

    def _spill_path(self, rel: str) -> Path:
        """The spill file of bundle file ``rel``, numbered in order of first use."""
        return self._spill / f"{self._spill_ids.setdefault(rel, len(self._spill_ids))}.bin"

    def add(self, module: MergedModule) -> MergedModule:
        """Write ``module`` (the next one of the bank, in order) and return it without tensors."""
        m, self._count = self._count, self._count + 1
        order = self._order
        placed = replace(module, a_index=[module.a_index[t] for t in order], b_index=[module.b_index[t] for t in order])
        for rel, tensors, specs in packed_module(sorted(self.tasks), m, placed):
            entries = self._entries.setdefault(rel, [])
            with open(self._spill_path(rel), "ab") as f:
                for spec in specs:
                    data = tensors[spec.key].contiguous().view(torch.uint8).numpy().tobytes()
                    entries.append((spec, self._sizes.get(rel, 0)))
                    self._sizes[rel] = self._sizes.get(rel, 0) + f.write(data)
        return replace(module, A=[f.spilled() for f in module.A], B=[f.spilled() for f in module.B])

    def finish(self, bank: MergedBank) -> None:
        """Write the tensor files and the manifest of ``bank`` (whose modules went through :meth:`add`)."""
        bank = sorted_tasks(bank)
        (self.folder / "tasks").mkdir()
        files = {}
        for rel, entries in self._entries.items():
            offsets = {spec.key: at for spec, at in entries}
            specs = [spec for spec, _ in entries]
            path = confined(self.folder, rel, BundleError)
            with open(path, "wb") as out, open(self._spill_path(rel), "rb") as spill:
                out.write(header_bytes(specs))
                for spec in file_order(specs):
                    spill.seek(offsets[spec.key])
                    out.write(spill.read(spec.nbytes))
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        shutil.rmtree(self._spill)
        (self.folder / MANIFEST).write_text(json.dumps(manifest_for(bank, files), separators=(",", ":")))


def read_manifest(path: Path) -> dict:
    """The manifest of bundle ``path``, checked against schemas/bundle-manifest.schema.json and
    :func:`check_manifest`; no tensor file has been opened yet."""
    mpath = Path(path) / MANIFEST

    def foreign(doc: object) -> str:
        says = doc if isinstance(doc, dict) else {}
        if says.get("format") == "hydraopt-bundle":
            what = f"version {says.get('version')!r}; older bundles: merge the adapters again"
        elif isinstance(says.get("schema"), str):
            what = f"it is a {says['schema']!r} manifest"  # e.g. an export's: its bundle is a folder inside it
        else:
            what = "no hydraopt bundle format named"
        return f"{mpath}: not a version-{FORMAT_VERSION} hydraopt bundle manifest ({what})"

    manifest = read_document(mpath, "bundle-manifest", BundleError, f"{mpath}: missing; {path} is not a bundle",
                             {"format": "hydraopt-bundle", "version": FORMAT_VERSION}, foreign)
    check_manifest(manifest, mpath)
    return manifest


def expected_tensors(manifest: dict) -> dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """Per file, the tensors (key -> dtype, shape) that the manifest's layouts imply."""
    out: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {}
    for m, (_, d_out, d_in, layout_id) in enumerate(manifest["modules"]):
        layout = manifest["layouts"][layout_id]
        fmt = NumberFormat.parse(layout["format"])
        for kind, ranks, index, length in (("A", layout["a_ranks"], layout["a_index"], d_in), ("B", layout["b_ranks"], layout["b_index"], d_out)):
            for i, rank in enumerate(ranks):
                if rank:
                    rel, at = factor_file(manifest["tasks"], index, i)
                    for part, (dtype, shape) in fmt.encoded_shapes(rank, length).items():
                        out.setdefault(rel, {})[factor_key(m, kind, at, part)] = (dtype, tuple(shape))
    return out


def check_manifest(manifest: dict, where: Path) -> None:
    """What the schema cannot say: task order and names, index bounds, ranks that fit, files."""
    tasks = manifest["tasks"]
    if tasks != sorted(tasks):
        raise BundleError(f"{where}: tasks are not in sorted order; a reordered list would attach factors to the wrong tasks")
    clash = duplicate_ignoring_case(tasks)
    if clash:
        raise BundleError(f"{where}: tasks {clash[0]!r} and {clash[1]!r} differ only in case")
    names = [m[0] for m in manifest["modules"]]
    if len(set(names)) != len(names):
        raise BundleError(f"{where}: a module is listed twice")
    for name, _, _, layout_id in manifest["modules"]:
        if layout_id >= len(manifest["layouts"]):
            raise BundleError(f"{where}: module {name!r}: layout {layout_id} of {len(manifest['layouts'])}")
    for n, layout in enumerate(manifest["layouts"]):
        at = f"{where}: layouts[{n}]"
        for kind in ("a", "b"):
            index, ranks = layout[f"{kind}_index"], layout[f"{kind}_ranks"]
            if len(index) != len(tasks):
                raise BundleError(f"{at}.{kind}_index: {len(index)} entries for {len(tasks)} tasks")
            if sorted(set(index)) != list(range(len(ranks))):
                raise BundleError(f"{at}.{kind}_index: must use each of the {len(ranks)} stored factors, and only those")
        for t, task in enumerate(tasks):
            ra, rb = layout["a_ranks"][layout["a_index"][t]], layout["b_ranks"][layout["b_index"][t]]
            if ra != rb:
                raise BundleError(f"{at}: task {task!r} pairs an A of rank {ra} with a B of rank {rb}")
    unknown = set(manifest["rel_errors"]) - set(tasks)
    if unknown:
        raise BundleError(f"{where}: rel_errors for tasks not in the bundle: {sorted(unknown)}")
    needed, listed = set(expected_tensors(manifest)), set(manifest["files"])
    if needed != listed:
        raise BundleError(f"{where}: files {sorted(listed)} but the layouts need {sorted(needed)}")
    if manifest["file_bytes"] != sum(f["bytes"] for f in manifest["files"].values()):
        raise BundleError(f"{where}: file_bytes is not the sum of the files' bytes")


def verify_files(path: Path, manifest: dict) -> dict[str, Path]:
    """Each listed file, confined to the bundle folder (symlinks included) and with the size and
    sha256 of the manifest; refuses any other."""
    paths = {}
    for rel, info in manifest["files"].items():
        f = confined(Path(path), rel, BundleError)
        wrong = mismatch(f, info["bytes"], info["sha256"])
        if wrong is not None and wrong.kind == "missing":
            raise BundleError(f"{f}: listed in the manifest but missing")
        if wrong is not None:
            raise BundleError(f"{f}: checksum mismatch with {MANIFEST} (file changed or corrupt)")
        paths[rel] = f
    return paths


def read_parts(path: Path, want: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """The parts ``want`` (key -> dtype, shape, as :func:`expected_tensors` gives a file's) of the
    bundle file ``path``: its one blob, checked to be exactly as long as they are together, sliced
    in storage.file_order; every float part checked finite."""
    try:
        with safe_open(str(path), framework="pt") as f:
            version, keys = (f.metadata() or {}).get("hydraopt_bundle"), list(f.keys())
            blob = f.get_tensor(BLOB) if keys == [BLOB] else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: unreadable safetensors ({e})") from e
    if version != FILE_METADATA["hydraopt_bundle"] or blob is None:
        raise BundleError(f"{path}: not a format-{FORMAT_VERSION} bundle file (one tensor {BLOB!r}; metadata hydraopt_bundle={version!r}, tensors {keys[:3]})")
    specs = file_order([TensorSpec(k, dtype, shape) for k, (dtype, shape) in want.items()])
    need = sum(s.nbytes for s in specs)
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() != need:
        raise BundleError(f"{path}: tensor {BLOB!r} is {blob.dtype} {list(blob.shape)}; the manifest's layouts need uint8 [{need}]")
    out, at = {}, 0
    for s in specs:
        out[s.key] = blob[at : at + s.nbytes].view(s.dtype).reshape(s.shape)
        at += s.nbytes
        if out[s.key].is_floating_point() and not torch.isfinite(out[s.key]).all():
            raise BundleError(f"{path}: part {s.key} holds NaN or Inf")
    return out


def load_bundle(path: str | Path) -> MergedBank:
    """Read a bundle, verifying everything first (:func:`open_bundle`)."""
    return open_bundle(path)[1]


def open_bundle(path: str | Path) -> tuple[dict, MergedBank]:
    """The checked manifest and the bank of bundle ``path``: the one reader behind ``unpack``,
    ``inspect`` and the exporters. Checks the manifest, every file's place, size and sha256, then
    every file's blob against the layouts (:func:`read_parts`), before building anything."""
    path = Path(path)
    manifest = read_manifest(path)
    files = verify_files(path, manifest)
    tensors: dict[str, torch.Tensor] = {}
    for rel, want in expected_tensors(manifest).items():
        tensors.update({f"{rel}:{k}": v for k, v in read_parts(files[rel], want).items()})
    tasks = manifest["tasks"]
    modules = {}
    for m, (name, d_out, d_in, layout_id) in enumerate(manifest["modules"]):
        layout = manifest["layouts"][layout_id]
        fmt = NumberFormat.parse(layout["format"])
        module = MergedModule((d_out, d_in), list(layout["a_index"]), list(layout["b_index"]), [], [])
        for kind, ranks, length in (("A", layout["a_ranks"], d_in), ("B", layout["b_ranks"], d_out)):
            for i, rank in enumerate(ranks):
                rel, index = factor_file(tasks, module.a_index if kind == "A" else module.b_index, i)
                parts = fmt.encoded_shapes(rank, length)
                if rank:
                    data = {part: tensors[f"{rel}:{factor_key(m, kind, index, part)}"] for part in parts}
                else:  # a rank-0 factor (a task without this module) stores nothing
                    data = {part: torch.zeros(shape, dtype=dtype) for part, (dtype, shape) in parts.items()}
                shape = (rank, d_in) if kind == "A" else (d_out, rank)
                (module.A if kind == "A" else module.B).append(StoredFactor(fmt, data, shape, kind == "B"))
        modules[name] = module
    return manifest, MergedBank(
        tasks=tasks,
        modules=modules,
        method=manifest["method"],
        params=manifest["params"],
        fingerprint={"base_model": manifest["base_model"], "module_shapes": {name: [o, i] for name, o, i, _ in manifest["modules"]}},
        reference_file_bytes=manifest["reference_file_bytes"],
        reference_payload_bytes=manifest["reference_payload_bytes"],
        rel_errors=manifest["rel_errors"],
    )
