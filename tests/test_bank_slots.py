"""The runtimes' numpy decoder of a bank's files (``device_runner.BankSlots``), which decodes a
task's factors in batches of one format and vector length, against the library's own decoder
(``MergedBank.task_factors``: torch, one factor at a time), on a bank whose ranks differ from
module to module and task to task, in every stored format, with shared and per-task factors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporters.targets.device_runner import BankSlots, Refused
from hydraopt_mobile.bank import MergedBank, grouped_module
from hydraopt_mobile.bundle import write_bundle_files
from hydraopt_mobile.formats import NumberFormat
from exporters.slots import bank_signature

TASKS = ["t0", "t1", "t2"]


def stored(path) -> tuple[str, bytes]:
    """A file as the decoder takes it (the runtimes read it once and check its digest first)."""
    return str(path), path.read_bytes()


def mixed_bank() -> MergedBank:
    g = torch.Generator().manual_seed(3)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    modules = {}
    for layer, fmt in enumerate(["int8", "int4-g32", "fp16", "int8"]):
        f = NumberFormat.parse(fmt)
        p = f"model.layers.{layer}.self_attn."
        ranks = [(2 + layer + t) % 5 + 1 for t in range(3)]  # 1..5, differing per task and layer
        modules[p + "q_proj"] = grouped_module((48, 40), [0, 1, 2], [0, 1, 2], [rnd(r, 40) for r in ranks],
                                               [rnd(48, r) for r in ranks], f)
        # A shared by t0 and t2 (rank 3), B per task at that rank
        modules[p + "v_proj"] = grouped_module((16, 40), [0, 1, 0], [0, 1, 2], [rnd(3, 40), rnd(3, 40)],
                                               [rnd(16, 3) for _ in TASKS], f)
    return MergedBank(list(TASKS), modules, "test-mixed-ranks")


def padded_reference(bank: MergedBank, task: str, signature: dict[str, int]) -> dict[str, np.ndarray]:
    out = {}
    for name, factors in bank.task_factors(task).items():
        rank, width = factors.A.shape[0], signature[name]
        a = np.zeros((width, factors.A.shape[1]), np.float32)
        b = np.zeros((factors.B.shape[0], width), np.float32)
        a[:rank], b[:, :rank] = factors.A.numpy(), factors.B.numpy()
        out[f"{name}.lora_a"], out[f"{name}.lora_b"] = a, b
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    bank = mixed_bank()
    folder = tmp_path_factory.mktemp("bank")
    bundle = write_bundle_files(bank, folder)
    signature = {name: rank + 2 for name, rank in bank_signature(bank).items()}  # room to pad
    slots = [[f"{n}.lora_a", [r, bank.modules[n].shape[1]]] for n, r in signature.items()]
    slots += [[f"{n}.lora_b", [bank.modules[n].shape[0], r]] for n, r in signature.items()]
    slots.append(["model.layers.9.self_attn.q_proj.lora_a", [4, 40]])  # a slot the bank leaves to the base
    slots_bank = BankSlots({"tasks": TASKS, "slots": slots, "bank": {"modules": bundle["modules"], "layouts": bundle["layouts"]}})
    slots_bank.load_shared(stored(folder / "shared.safetensors"))
    return bank, folder, signature, slots_bank


@pytest.mark.parametrize("task", TASKS)
def test_batched_decode_equals_the_library_decoder(written, task):
    bank, folder, signature, slots_bank = written
    got = slots_bank.task_slots(task, stored(folder / "tasks" / f"{task}.safetensors"))
    want = padded_reference(bank, task, signature)
    for slot, value in want.items():
        assert got[slot].shape == value.shape and got[slot].dtype == np.float32, slot
        np.testing.assert_allclose(got[slot], value, rtol=0, atol=1e-6, err_msg=slot)
    assert not got["model.layers.9.self_attn.q_proj.lora_a"].any()
    assert len(got) == len(want) + 1


def test_a_task_file_of_another_task_is_refused(written):
    _, folder, _, slots_bank = written
    with pytest.raises(Refused, match="t1"):
        slots_bank.task_slots("t0", stored(folder / "tasks" / "t1.safetensors"))


def test_a_bank_file_of_bundle_format_2_is_refused(written, tmp_path):
    """A file with a header entry per part (the format before 3) is refused, naming the file."""
    from safetensors.torch import save

    _, folder, _, slots_bank = written
    blob = save({"0.A.w": torch.zeros(2, 3, dtype=torch.float16)}, metadata={"hydraopt_bundle": "2"})
    with pytest.raises(Refused, match="old.safetensors: not a bank file of bundle format 3 .*format '2'"):
        slots_bank.task_slots("t0", ("old.safetensors", blob))


def test_tasks_of_one_layout_share_one_read_plan_and_a_changed_file_is_planned_anew(tmp_path):
    """Two tasks with the same ranks and format write files with identical headers: the second
    load reuses the first's read plan and still decodes its own values; a file with that header
    but other bytes after it (truncated) is not served from the plan but refused."""
    g = torch.Generator().manual_seed(5)
    f = NumberFormat.parse("int4-g32")
    modules = {"model.layers.0.self_attn.q_proj": grouped_module(
        (48, 40), [0, 1], [0, 1], [torch.randn(3, 40, generator=g) for _ in range(2)],
        [torch.randn(48, 3, generator=g) for _ in range(2)], f)}
    bank = MergedBank(["a", "b"], modules, "test-one-layout")
    bundle = write_bundle_files(bank, tmp_path)
    slots = [["model.layers.0.self_attn.q_proj.lora_a", [4, 40]], ["model.layers.0.self_attn.q_proj.lora_b", [48, 4]]]
    slots_bank = BankSlots({"tasks": ["a", "b"], "slots": slots, "bank": {"modules": bundle["modules"], "layouts": bundle["layouts"]}})
    slots_bank.load_shared(None)
    for task in ["a", "b"]:
        got = slots_bank.task_slots(task, stored(tmp_path / "tasks" / f"{task}.safetensors"))
        for slot, value in padded_reference(bank, task, {"model.layers.0.self_attn.q_proj": 4}).items():
            np.testing.assert_allclose(got[slot], value, rtol=0, atol=1e-6, err_msg=f"{task} {slot}")
    assert len(slots_bank._read_plans) == 1
    name, blob = stored(tmp_path / "tasks" / "b.safetensors")
    with pytest.raises(Refused, match="is not the .* uint8 bytes the bank's layouts need"):
        slots_bank.task_slots("b", (name, blob[:-1]))


def test_a_released_task_s_memory_serves_the_next_load_of_its_layout_only(written, tmp_path):
    """After ``release``, a task of the same layout decodes into the released arrays (its padding
    still zero, its values its own); a task of another layout gets fresh arrays."""
    g = torch.Generator().manual_seed(7)
    f = NumberFormat.parse("int8")
    name = "model.layers.0.self_attn.q_proj"
    modules = {name: grouped_module((48, 40), [0, 1], [0, 1], [torch.randn(2, 40, generator=g) for _ in range(2)],
                                    [torch.randn(48, 2, generator=g) for _ in range(2)], f)}
    bank = MergedBank(["a", "b"], modules, "test-release")
    bundle = write_bundle_files(bank, tmp_path)
    slots = [[f"{name}.lora_a", [5, 40]], [f"{name}.lora_b", [48, 5]]]
    slots_bank = BankSlots({"tasks": ["a", "b"], "slots": slots, "bank": {"modules": bundle["modules"], "layouts": bundle["layouts"]}})
    slots_bank.load_shared(None)
    a = slots_bank.task_slots("a", stored(tmp_path / "tasks" / "a.safetensors"))
    slots_bank.release(a)
    b = slots_bank.task_slots("b", stored(tmp_path / "tasks" / "b.safetensors"))
    assert all(np.shares_memory(a[slot], b[slot]) for slot in b)
    for slot, value in padded_reference(bank, "b", {name: 5}).items():
        np.testing.assert_array_equal(b[slot], value, err_msg=slot)

    mixed, folder, _, mixed_slots = written  # its three tasks have three layouts
    t0 = mixed_slots.task_slots("t0", stored(folder / "tasks" / "t0.safetensors"))
    mixed_slots.release(t0)
    t1 = mixed_slots.task_slots("t1", stored(folder / "tasks" / "t1.safetensors"))
    assert not any(np.shares_memory(t0[slot], t1[slot]) for slot in t1 if t1[slot].any())
