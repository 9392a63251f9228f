"""The manifest of an export: what each file is, its bytes and SHA-256, and which tensors a task fills.

Version 4 (3: bank files of bundle format 2, one header entry per part; 2: without ``placement``): the data files are the bank's own bundle files under ``bank/`` (``shared.safetensors``,
loaded once, and ``tasks/<task>.safetensors``, read on each task load), so an export's data bytes
are the bank's file bytes; ``slots`` lists the program's slot inputs, ``placement`` where a
module's slot lies inside an input that stacks several (ONNX: q, k and v of one attention), ``bank``
the bundle's ``modules`` and ``layouts`` that say which factor of which file fills which module slot.

A task file is checked against the manifest (size, then SHA-256 of its bytes) before any runtime
sees it, so a file from another export, a truncated copy or a corrupted download is refused with
an error that names the file, instead of producing wrong outputs or crashing a runtime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydraopt_mobile.checksum import mismatch, read_listed, sha256_file
from hydraopt_mobile.paths import confined, duplicate_ignoring_case
from hydraopt_mobile.schemas import read_document
from hydraopt_mobile.errors import UserError

MANIFEST = "manifest.json"
SCHEMA = "hydraopt-export/4"


class TaskFileError(UserError):
    """A file of the export (a task's, the shared one, the program) that is missing, does not belong
    to this export, or whose bytes are not the exported ones."""


class ManifestError(UserError):
    """An export manifest that breaks schemas/export-manifest.schema.json or refers outside its folder."""


@dataclass
class FileEntry:
    path: str  # relative to the export folder
    bytes: int
    sha256: str
    role: str  # "program" | "shared" | "task" | "bank" (the bundle manifest) | "reference" (merged exports) | "tokenizer"
    task: str | None = None


@dataclass
class Manifest:
    export_id: str
    runtime: str  # "executorch" | "onnxruntime"
    quant: str
    method: str
    tasks: list[str]
    files: list[FileEntry]
    slots: list  # [slot, shape] in program order: the program's LoRA slot inputs, fp32
    placement: list  # [module slot, shape, program slot, row, column]: a module slot inside a stacked input (exporters/onnx_fuse.py)
    signature: dict[str, int]  # module -> rank
    bank: dict  # the bundle's "modules" and "layouts" (exporters/targets/device_runner.py: BankSlots)
    task_files: dict[str, list[str]]  # task -> the data files it reads (the shared file once for all)
    program: dict  # "sha256" and the program cache "key" (base model, runtime, quant, cache length, signature)
    tokenizer_dir: str | None
    bank_fingerprint: dict
    model: dict  # what the runtime needs: layers, kv heads, head dim, vocab, eos, max cache length
    extra: dict = field(default_factory=dict)

    def entry(self, role: str, task: str | None = None) -> FileEntry:
        for f in self.files:
            if f.role == role and f.task == task:
                return f
        raise ManifestError(f"export {self.export_id}: no {role} file" + (f" for task {task!r}" if task else ""))

    def find(self, role: str, task: str | None = None) -> FileEntry | None:
        return next((f for f in self.files if f.role == role and f.task == task), None)

    def task_file(self, task: str) -> FileEntry | None:
        """``task``'s own data file (None: every factor it uses is in the shared file)."""
        if task not in self.tasks:
            raise UserError(f"task {task!r} is not in export {self.export_id} (tasks: {', '.join(self.tasks)})")
        return self.find("task", task)

    def task_bytes(self, task: str) -> int:
        entry = self.task_file(task)
        return entry.bytes if entry else 0

    def bytes_of(self, role: str) -> int:
        return sum(f.bytes for f in self.files if f.role == role)

    def resident_bytes(self) -> int:
        """What stays loaded whatever the task: the program and the bank's shared file."""
        return self.bytes_of("program") + self.bytes_of("shared")

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST
        path.write_text(json.dumps({"schema": SCHEMA, **asdict(self)}, indent=1, default=str))
        return path

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        """Parse and check the manifest of ``folder`` (schema, then what a schema cannot say)."""
        path = Path(folder) / MANIFEST

        def foreign(doc: object) -> str:
            says = doc if isinstance(doc, dict) else {}
            if says.get("format") == "hydraopt-bundle":  # what `hydraopt merge` writes: one step before an export
                return f"{path}: not a {SCHEMA} manifest: {folder} is a bundle; export it first (hydraopt export {folder} --out EXPORT)"
            if isinstance(says.get("schema"), str) and says["schema"].startswith("hydraopt-export/"):
                return f"{path}: not a {SCHEMA} manifest (it is {says['schema']!r}: export the bundle again)"
            return f"{path}: not a {SCHEMA} manifest"

        raw = read_document(path, "export-manifest", ManifestError, f"{folder}: no {MANIFEST}; not an export folder",
                            {"schema": SCHEMA}, foreign)
        raw.pop("schema")
        raw["files"] = [FileEntry(**f) for f in raw["files"]]
        manifest = cls(**raw)
        manifest.check(Path(folder))
        return manifest

    def check(self, folder: Path) -> None:
        """Every path inside ``folder`` (symlinks resolved); one program; task files match the tasks."""
        where = folder / MANIFEST
        clash = duplicate_ignoring_case(self.tasks)
        if clash:
            raise ManifestError(f"{where}: tasks {clash[0]!r} and {clash[1]!r} differ only in case")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ManifestError(f"{where}: a file is listed twice")
        for rel in paths + ([self.tokenizer_dir] if self.tokenizer_dir else []):
            confined(folder, rel, ManifestError)
        if [f.role for f in self.files].count("program") != 1 or [f.role for f in self.files].count("shared") > 1:
            raise ManifestError(f"{where}: needs exactly one program file and at most one shared file")
        for f in self.files:
            if (f.role == "task") != (f.task is not None) or (f.task is not None and f.task not in self.tasks):
                raise ManifestError(f"{where}: file {f.path!r}: role {f.role!r} with task {f.task!r} does not fit the task list")
        task_files = [f.task for f in self.files if f.role == "task"]
        if len(set(task_files)) != len(task_files) or (task_files and not self.slots):
            raise ManifestError(f"{where}: a task has two files, or an export without slots has task files")
        listed = {f.path for f in self.files}
        for task, used in self.task_files.items():
            if task not in self.tasks or not set(used) <= listed:
                raise ManifestError(f"{where}: task_files[{task!r}] names a task or file the manifest does not list")


def file_entry(folder: Path, rel: str, role: str, task: str | None = None) -> FileEntry:
    path = folder / rel
    return FileEntry(rel, path.stat().st_size, sha256_file(path), role, task)


def verified_task_file(manifest: Manifest, folder: Path, task: str, path: Path | None = None) -> tuple[Path, bytes] | None:
    """``task``'s own file as ``(path, bytes)``, read once, after checking its size and the SHA-256 of
    those bytes against the manifest (None: the task has no file of its own).

    ``path`` overrides where the file is read from (a file shipped separately); it must still be
    byte-identical to what this export wrote for ``task``.
    """
    entry = manifest.task_file(task)
    if entry is None:
        return None
    path = Path(path) if path is not None else confined(Path(folder), entry.path, TaskFileError)
    found = read_listed(path, entry.bytes, entry.sha256)
    if isinstance(found, bytes):
        return path, found
    if found.kind == "missing":
        raise TaskFileError(f"{path}: task file for {task!r} is missing")
    if found.kind == "size":
        raise TaskFileError(
            f"{path}: {found.found} bytes, but export {manifest.export_id} wrote {entry.bytes} for task {task!r}; "
            "it is truncated or belongs to another export"
        )
    others = [f.task for f in manifest.files if f.role == "task" and f.sha256 == found.found]
    hint = f" (it is this export's file for {others[0]!r})" if others else " (from another export, or corrupted)"
    raise TaskFileError(
        f"{path}: SHA-256 {str(found.found)[:16]}... does not match export {manifest.export_id}'s task {task!r} "
        f"({entry.sha256[:16]}...){hint}; refusing to load it"
    )


def verified_shared_file(manifest: Manifest, folder: Path) -> tuple[Path, bytes] | None:
    """The bank's shared file as ``(path, bytes)``, its size and SHA-256 checked (None: the bank has none)."""
    entry = manifest.find("shared")
    if entry is None:
        return None
    path = confined(Path(folder), entry.path, TaskFileError)
    found = read_listed(path, entry.bytes, entry.sha256)
    if not isinstance(found, bytes):
        raise TaskFileError(f"{path}: the shared file does not match export {manifest.export_id}'s manifest (missing, truncated or changed)")
    return path, found


def verified_program(manifest: Manifest, folder: Path) -> Path:
    """The program file, once it is there at the size the export wrote. Its SHA-256 is not read on
    every open (hundreds of MB; the runtime parses it anyway): a missing or truncated program is
    named here instead of failing inside the runtime's loader."""
    entry = manifest.entry("program")
    path = confined(Path(folder), entry.path, TaskFileError)
    if not path.is_file():
        raise TaskFileError(f"{path}: the export's program is missing (copy the whole export folder, or export again)")
    if (size := path.stat().st_size) != entry.bytes:
        raise TaskFileError(f"{path}: {size:,} bytes, but export {manifest.export_id} wrote {entry.bytes:,}: "
                            "the program is truncated or replaced (export again)")
    return path


def bank_budget(manifest: Manifest, folder: Path) -> str | None:
    """The budget the export's bank was merged at (its bundle manifest's ``params.budget``, as the
    user gave it: ``0.0833``), None for a fixed-storage method or a merged export without a bank."""
    entry = manifest.find("bank")
    if entry is None:
        return None
    return json.loads((Path(folder) / entry.path).read_text()).get("params", {}).get("budget")


def verify_all(manifest: Manifest, folder: Path) -> None:
    """Check every file of the export (used by tests and ``bench``)."""
    for f in manifest.files:
        path = confined(Path(folder), f.path, TaskFileError)
        if mismatch(path, f.bytes, f.sha256) is not None:
            raise TaskFileError(f"{path}: does not match the manifest of export {manifest.export_id}")
