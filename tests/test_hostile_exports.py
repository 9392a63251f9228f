"""Edited export folders (issue 11): every path a reader opens lies inside the export, symlinks
included; the manifest's structure is checked against its schema before anything is opened."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from exporters.export import export_bank
from exporters.manifest import MANIFEST, Manifest, ManifestError, TaskFileError, verified_task_file, verify_all
from exporters.runtime import open_export
from tiny_models import make_bank, make_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_export")
    return export_bank(make_bank(seed=1), make_tiny_model(root / "model"), "onnx", "fp32", root / "export")


@pytest.fixture
def copy(export, tmp_path):
    """A private copy of the export, and a function that edits its manifest."""
    folder = shutil.copytree(export, tmp_path / "export")

    def edit(change) -> None:
        raw = json.loads((folder / MANIFEST).read_text())
        raw = change(raw) or raw
        (folder / MANIFEST).write_text(json.dumps(raw))

    return folder, edit


def _task_entry(raw: dict, task: str) -> dict:
    return next(f for f in raw["files"] if f["task"] == task)


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_file_entry_pointing_outside_is_refused_even_with_a_matching_checksum(copy, tmp_path, where):
    folder, edit = copy
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "bank" / "tasks" / "alpha.safetensors", outside)
    rel = str(outside) if where == "absolute" else "../outside.safetensors"
    edit(lambda raw: _task_entry(raw, "alpha").update(path=rel))
    with pytest.raises(ManifestError, match="outside"):
        Manifest.read(folder)


def test_symlink_out_of_the_export_is_refused(copy, tmp_path):
    folder, _ = copy
    task_file = folder / "bank" / "tasks" / "alpha.safetensors"
    outside = tmp_path / "elsewhere.bin"
    shutil.move(task_file, outside)
    task_file.symlink_to(outside)  # same bytes, same checksum: only the path gives it away
    with pytest.raises(ManifestError, match="through a symlink"):
        Manifest.read(folder)
    with pytest.raises(ManifestError, match="through a symlink"):
        open_export(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: [raw], "not a hydraopt-export/4 manifest"),
        (lambda raw: {"format": "hydraopt-bundle", "version": 3}, r"is a bundle; export it first \(hydraopt export .* --out EXPORT\)"),
        (lambda raw: raw.update(schema="hydraopt-export/3"), r"\(it is 'hydraopt-export/3': export the bundle again\)"),
        (lambda raw: raw.update(tasks=raw["tasks"] + ["ALPHA"]), "differ only in case"),
        (lambda raw: raw.update(tasks=["../x"] + raw["tasks"][1:]), "tasks"),
        (lambda raw: raw["files"].remove(_task_entry(raw, "beta")), "names a task or file the manifest does not list"),
        (lambda raw: raw["files"].append({**_task_entry(raw, "beta"), "path": "bank/x"}), "a task has two files"),
        (lambda raw: _task_entry(raw, "beta").update(task="delta"), "does not fit the task list"),
        (lambda raw: _task_entry(raw, "beta").update(bytes=-1), "less than the minimum"),
        (lambda raw: raw["model"].update(max_cache_len="256"), "max_cache_len: is a string"),
        (lambda raw: raw.update(files=raw["files"] + raw["files"][:1]), "listed twice"),
        (lambda raw: raw.update(tokenizer_dir="/etc"), "tokenizer_dir"),
    ],
)
def test_manifest_structure_is_checked(copy, change, message):
    folder, edit = copy
    edit(change)
    with pytest.raises(ManifestError, match=message):
        Manifest.read(folder)


def test_untouched_export_passes_and_an_explicit_task_file_is_still_checked(copy, tmp_path):
    folder, _ = copy
    manifest = Manifest.read(folder)
    verify_all(manifest, folder)
    shipped = tmp_path / "shipped.safetensors"
    shutil.copy(folder / "bank" / "tasks" / "gamma.safetensors", shipped)  # alpha's and gamma's files have one layout
    assert verified_task_file(manifest, folder, "gamma", shipped)[0] == shipped
    with pytest.raises(TaskFileError, match="this export's file for 'gamma'"):
        verified_task_file(manifest, folder, "alpha", shipped)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_program_is_named_before_the_runtime_loads_it(copy, damage):
    """Before, ONNX Runtime's loader failed with a traceback ("INVALID_PROTOBUF", "NO_SUCHFILE")."""
    folder, _ = copy
    program = folder / Manifest.read(folder).entry("program").path
    if damage == "missing":
        program.unlink()
    else:
        program.write_bytes(program.read_bytes()[:1000])
    with pytest.raises(TaskFileError, match="program is (missing|truncated or replaced)") as e:
        open_export(folder)
    assert str(program) in str(e.value)
