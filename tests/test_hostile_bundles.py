"""Edited bundles (issue 11): no read outside the bundle, no silently wrong task, no traceback, and
``inspect`` accepts exactly what ``unpack`` (and so the exporters) accept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hydraopt_mobile.bundle import BundleError, load_bundle, sha256_file
from hydraopt_mobile.app.cli import app, console

runner = CliRunner()
console.width = 250


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), f"traceback: {result.exception!r}"
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A 4-task bundle whose A factors are shared by pairs of tasks (t0,t1) and (t2,t3), B per task:
    the case where a reordered task list would silently hand a task another pair's A."""
    root = tmp_path_factory.mktemp("hostile_bundle")
    from hydraopt_mobile.adapters import build_adapter_set, load_adapter
    from hydraopt_mobile.bank import MergedBank, grouped_module
    from hydraopt_mobile.bundle import write_bundle
    from hydraopt_mobile.formats import NumberFormat
    from hydraopt_mobile.synthetic import llama_shapes, planted_factors, write_peft_adapter

    shapes = llama_shapes(2, 64, 32)
    factors = planted_factors(shapes, 4, 4, 0.3, 0)
    adapters = build_adapter_set([load_adapter(write_peft_adapter(root / "ad" / f"t{t}", f, 4, 8), f"t{t}") for t, f in enumerate(factors)])
    modules = {}
    for name in adapters.module_names:
        fs = adapters.factors(name)
        modules[name] = grouped_module(adapters.shapes[name], [0, 0, 1, 1], [0, 1, 2, 3], [fs[0].A, fs[2].A], [f.B for f in fs], NumberFormat("fp16"))
    bank = MergedBank(adapters.task_names, modules, "test-pairs", fingerprint=adapters.fingerprint())
    return write_bundle(bank, root / "bundle")


@pytest.fixture
def bundle(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


def edit(bundle: Path, change) -> None:
    raw = json.loads((bundle / "manifest.json").read_text())
    result = change(raw)
    raw = result if isinstance(result, list) else raw  # a change may replace the whole document
    (bundle / "manifest.json").write_text(json.dumps(raw))


def both_refuse(bundle: Path, message: str) -> None:
    """unpack and inspect refuse alike, with one line naming the problem."""
    for args in (["unpack", bundle, "--task", "t0", "--out", bundle.parent / "u"], ["inspect", bundle]):
        code, text = run(*args)
        assert code == 2 and message in text, (args[0], text)
    assert not (bundle.parent / "u").exists()


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_file_entry_outside_the_bundle_is_not_read_even_with_a_matching_checksum(bundle, tmp_path, where):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(bundle / "tasks" / "t0.safetensors", outside)
    rel = str(outside) if where == "absolute" else "../outside.safetensors"
    edit(bundle, lambda raw: raw.update(files={(rel if k == "tasks/t0.safetensors" else k): v for k, v in raw["files"].items()}))
    both_refuse(bundle, "files")


def test_symlink_out_of_the_bundle_is_not_followed(bundle, tmp_path):
    task = bundle / "tasks" / "t0.safetensors"
    shutil.move(task, tmp_path / "elsewhere.safetensors")
    task.symlink_to(tmp_path / "elsewhere.safetensors")  # same bytes: the checksum matches
    both_refuse(bundle, "leads outside the folder through a symlink")


def test_reordered_task_list_is_refused_not_a_silently_wrong_task(bundle, pristine):
    edit(bundle, lambda raw: raw.update(tasks=["t0", "t2", "t1", "t3"]))
    both_refuse(bundle, "not in sorted order")
    # what it guards against: with positions swapped, t2 would get t0's shared A
    good = load_bundle(pristine)
    assert not torch.equal(good.task_factors("t2")[next(iter(good.modules))].A, good.task_factors("t0")[next(iter(good.modules))].A)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: raw["layouts"][0]["b_index"].__setitem__(0, -1), "b_index[0]: -1 is less than the minimum of 0"),
        (lambda raw: raw["layouts"][0]["a_index"].__setitem__(0, 99), "a_index: must use each of the 2 stored factors"),
        (lambda raw: raw["modules"][0].__setitem__(3, 99), "layout 99 of"),
        (lambda raw: raw["modules"][0].__setitem__(3, 0.0), "modules[0][3]: is a number 0.0, expected integer"),
        (lambda raw: [raw], "not a version-3 hydraopt bundle manifest"),
        (lambda raw: raw.update(reference_file_bytes="12MB"), "reference_file_bytes: is a string"),
        (lambda raw: raw["layouts"][0]["b_ranks"].__setitem__(0, 3), "pairs an A of rank 4 with a B of rank 3"),
        (lambda raw: raw["layouts"][0]["a_index"].pop(), "a_index: 3 entries for 4 tasks"),
        (lambda raw: raw.update(tasks=["t0", "t1", "t2", "t4"]), "the layouts need ['shared.safetensors', 'tasks/t0.safetensors', 'tasks/t1.safetensors', 'tasks/t2.safetensors', 'tasks/t4.safetensors']"),
        (lambda raw: raw.update(tasks=["T0", "t1", "t2", "t3"]), "the layouts need"),
        (lambda raw: raw["files"].pop("tasks/t3.safetensors"), "the layouts need"),
        (lambda raw: raw.update(tasks=["t0", "t1", "t2", "../t3"]), "tasks[3]"),
        (lambda raw: raw["layouts"][0].update(format="int4-g7"), "format"),
        (lambda raw: raw.update(version=2), "not a version-3 hydraopt bundle manifest (version 2; older bundles: merge the adapters again)"),
    ],
)
def test_manifest_structure_is_checked_by_unpack_and_inspect_alike(bundle, change, message):
    edit(bundle, change)
    both_refuse(bundle, message)


def test_an_export_manifest_is_named_as_such(bundle):
    """A folder whose manifest is an export's: unpack says what it is; inspect reads it as the
    export it claims to be and names what is missing from that manifest."""
    edit(bundle, lambda raw: (raw.clear(), raw.update(schema="hydraopt-export/4")))
    code, text = run("unpack", bundle, "--task", "t0", "--out", bundle.parent / "u")
    assert code == 2 and "not a version-3 hydraopt bundle manifest (it is a 'hydraopt-export/4' manifest)" in text, text
    code, text = run("inspect", bundle)
    assert code == 2 and "manifest.json" in text and "required" in text, text


@pytest.mark.parametrize(
    "rewrite, message",
    [
        (lambda blob: {"data": blob[:-2]}, "tensor 'data' is torch.uint8 ["),  # a part short: the layouts need more
        (lambda blob: {"data": blob.view(torch.float16)}, "the manifest's layouts need uint8"),
        (lambda blob: {"data": blob, "extra": blob[:2].clone()}, "not a format-3 bundle file"),
        (lambda blob: {"0.A.w": blob}, "not a format-3 bundle file"),
        (lambda blob: {"data": torch.cat([torch.tensor([0, 0x7E], dtype=torch.uint8), blob[2:]])}, "holds NaN or Inf"),  # fp16 NaN in the first part (fp16 parts come first)
    ],
)
def test_blob_that_does_not_match_the_layouts_with_an_updated_checksum_is_refused(bundle, rewrite, message):
    task = bundle / "tasks" / "t0.safetensors"
    blob = load_file(task)["data"]
    save_file(rewrite(blob), task, metadata={"hydraopt_bundle": "3"})

    def new_checksum(raw):
        raw["files"]["tasks/t0.safetensors"] = {"bytes": task.stat().st_size, "sha256": sha256_file(task)}
        raw["file_bytes"] = sum(f["bytes"] for f in raw["files"].values())

    edit(bundle, new_checksum)
    both_refuse(bundle, message)
    with pytest.raises(BundleError):
        load_bundle(bundle)


def test_format_2_file_with_an_updated_checksum_is_refused(bundle):
    """A file of the old format (a header entry per part) under a version-3 manifest."""
    task = bundle / "tasks" / "t0.safetensors"
    save_file({"0.A.w": torch.zeros(4, 64, dtype=torch.float16)}, task, metadata={"hydraopt_bundle": "2"})

    def new_checksum(raw):
        raw["files"]["tasks/t0.safetensors"] = {"bytes": task.stat().st_size, "sha256": sha256_file(task)}
        raw["file_bytes"] = sum(f["bytes"] for f in raw["files"].values())

    edit(bundle, new_checksum)
    both_refuse(bundle, "metadata hydraopt_bundle='2'")


def test_untouched_bundle_is_accepted_by_both(bundle):
    assert run("inspect", bundle)[0] == 0
    code, text = run("unpack", bundle, "--task", "t2", "--out", bundle.parent / "u")
    assert code == 0, text
