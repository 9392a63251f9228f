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
    slots_bank.load_shared(str(folder / "shared.safetensors"))
    return bank, folder, signature, slots_bank


@pytest.mark.parametrize("task", TASKS)
def test_batched_decode_equals_the_library_decoder(written, task):
    bank, folder, signature, slots_bank = written
    got = slots_bank.task_slots(task, str(folder / "tasks" / f"{task}.safetensors"))
    want = padded_reference(bank, task, signature)
    for slot, value in want.items():
        assert got[slot].shape == value.shape and got[slot].dtype == np.float32, slot
        np.testing.assert_allclose(got[slot], value, rtol=0, atol=1e-6, err_msg=slot)
    assert not got["model.layers.9.self_attn.q_proj.lora_a"].any()
    assert len(got) == len(want) + 1


def test_a_task_file_of_another_task_is_refused(written):
    _, folder, _, slots_bank = written
    with pytest.raises(Refused, match="t1"):
        slots_bank.task_slots("t0", str(folder / "tasks" / "t1.safetensors"))
