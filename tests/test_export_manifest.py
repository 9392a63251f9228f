"""Export folders: manifest accuracy, refusal of foreign task files, atomic and non-clobbering writes.

ONNX exports only (seconds each); the ExecuTorch-specific refusals are in test_export_runtimes.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exporters.export import bank_digest, export_bank
from exporters.manifest import MANIFEST, Manifest, TaskFileError
from exporters.runtime import greedy, open_export
from hydraopt_mobile.atomic import OutputExists
from hydraopt_mobile.checksum import sha256_file
from hydraopt_mobile.errors import UserError
from tiny_models import PROMPT, TASKS, make_bank, make_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    model_dir = make_tiny_model(root / "model")
    first = export_bank(make_bank(seed=1), model_dir, "onnx", "fp32", root / "first")
    second = export_bank(make_bank(seed=2), model_dir, "onnx", "fp32", root / "second")
    return model_dir, first, second


def test_manifest_lists_every_file_with_its_bytes_and_sha256(setup):
    _, first, _ = setup
    manifest = Manifest.read(first)
    on_disk = {p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file()} - {MANIFEST}
    assert {f.path for f in manifest.files} == on_disk
    for f in manifest.files:
        assert (first / f.path).stat().st_size == f.bytes
        assert sha256_file(first / f.path) == f.sha256
    assert manifest.tasks == TASKS
    assert {f.task for f in manifest.files if f.role == "task"} == set(TASKS)
    # every slot of the signature is in an input (q, v, o: A and B, rank 4), whatever the bank shares:
    # o_proj's as they are, q's and v's stacked per attention (exporters/onnx_fuse.py)
    attn = [f"model.layers.{i}.self_attn" for i in range(2)]
    assert manifest.slots == [[f"{a}.o_proj.{s}", shape] for a in attn for s, shape in (("lora_a", [4, 64]), ("lora_b", [64, 4]))] + [
        [f"{a}.qkv_proj.{s}", shape] for a in attn for s, shape in (("lora_a", [8, 64]), ("lora_b", [128, 8]))]
    # A: q's 4 rows then v's; B: q's 64 output rows x first 4 columns, v's rows after k's 32 x last 4
    assert manifest.placement == [entry for a in attn for entry in (
        [f"{a}.q_proj.lora_a", [4, 64], f"{a}.qkv_proj.lora_a", 0, 0], [f"{a}.q_proj.lora_b", [64, 4], f"{a}.qkv_proj.lora_b", 0, 0],
        [f"{a}.v_proj.lora_a", [4, 64], f"{a}.qkv_proj.lora_a", 4, 0], [f"{a}.v_proj.lora_b", [32, 4], f"{a}.qkv_proj.lora_b", 96, 4])]
    assert set(manifest.signature.values()) == {4}
    assert manifest.task_files["alpha"] == ["bank/shared.safetensors", "bank/tasks/alpha.safetensors"]


def test_group_factor_is_stored_once_in_the_shared_file(setup):
    """v_proj's A0 serves alpha and gamma (a group of 2 of 3 tasks): one copy, in the shared file."""
    from hydraopt_mobile.bundle import expected_tensors, read_manifest, read_parts

    _, first, _ = setup
    want = expected_tensors(read_manifest(first / "bank"))
    keys = {}
    for rel in ["bank/shared.safetensors"] + [f"bank/tasks/{t}.safetensors" for t in TASKS]:
        keys[rel] = set(read_parts(first / rel, want[rel.removeprefix("bank/")]))  # the file holds exactly these parts
    v_a = [f"{m}.A0.w" for m in (1, 4)]  # module order q, v, o per layer: v_proj is module 1 and 4
    assert set(v_a) <= keys["bank/shared.safetensors"]
    assert all(f"{m}.A.w" not in keys[f"bank/tasks/{t}.safetensors"] for m in (1, 4) for t in ("alpha", "gamma"))
    assert {f"{m}.A.w" for m in (1, 4)} <= keys["bank/tasks/beta.safetensors"]  # beta's own A1


def test_manifest_names_the_bank_it_holds(setup):
    _, first, second = setup
    assert Manifest.read(first).extra["bank_digest"] == bank_digest(make_bank(seed=1))
    assert Manifest.read(second).extra["bank_digest"] == bank_digest(make_bank(seed=2)) != bank_digest(make_bank(seed=1))


def test_task_file_of_another_export_is_refused(setup):
    _, first, second = setup
    foreign = second / Manifest.read(second).task_file("alpha").path
    session = open_export(first)
    with pytest.raises(TaskFileError, match="another export"):
        session.load_task("alpha", foreign)
    assert "alpha" not in session.decoded
    session.load_task("alpha")  # its own file is accepted
    assert "alpha" in session.decoded


def test_existing_output_is_not_overwritten_unless_asked(setup):
    model_dir, first, _ = setup
    before = json.loads((first / MANIFEST).read_text())["export_id"]
    with pytest.raises(OutputExists):
        export_bank(make_bank(seed=3), model_dir, "onnx", "fp32", first)
    assert json.loads((first / MANIFEST).read_text())["export_id"] == before
    export_bank(make_bank(seed=3), model_dir, "onnx", "fp32", first, overwrite=True)
    assert json.loads((first / MANIFEST).read_text())["export_id"] != before
    assert [p.name for p in first.parent.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_failed_export_leaves_nothing_behind(setup, tmp_path):
    model_dir, _, _ = setup
    with pytest.raises(ValueError, match="quant"):
        export_bank(make_bank(), model_dir, "onnx", "8da4w", tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_merged_reference_export_equals_the_slot_export_of_that_task(setup, tmp_path):
    model_dir, first, _ = setup
    bank = make_bank(seed=1)
    slots = open_export(export_bank(bank, model_dir, "onnx", "fp32", tmp_path / "slots"))
    merged = open_export(export_bank(bank, model_dir, "onnx", "fp32", tmp_path / "merged", merged_task="beta"))
    assert Manifest.read(tmp_path / "merged").slots == []
    slots.set_task("beta")
    merged.set_task("beta")
    a = greedy(slots, PROMPT, 6, keep_logits=True)
    b = greedy(merged, PROMPT, 6, keep_logits=True)
    assert a.tokens == b.tokens
    assert np.abs(a.logits[0] - b.logits[0]).max() < 1e-4
    with pytest.raises(UserError, match="serves only"):
        merged.set_task("alpha")
