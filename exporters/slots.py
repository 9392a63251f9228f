"""LoRA slots: a Hugging Face causal LM whose target Linears compute ``W x + B (A x)``.

A merged bank says, per module, whether its A and its B are shared by every task (then the export
keeps them *resident*, baked into the graph) or differ between tasks (then they are *switchable*:
a slot the runtime fills from a per-task file). Both back ends use the same wrapped model; they
differ only in how a switchable slot is filled (ExecuTorch: mutable buffers written by a
``set_task`` method; ONNX Runtime: graph inputs with defaults fed by ``.onnx_adapter`` files).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hydraopt_mobile.adapters import LoraFactors
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.formats import StoredFactor

SLOT_A = "lora_a"
SLOT_B = "lora_b"
TASK_DTYPE = torch.float16  # task tensors are stored and fed in fp16: lossless for fp16 banks


@dataclass
class SlotLayout:
    """Which LoRA tensors are resident and which each task file fills.

    Slot names are ``<module>.lora_a`` / ``<module>.lora_b`` with ``module`` relative to the
    ``LlamaForCausalLM`` (bank naming), so they are also the buffers' names in the wrapped model.
    """

    tasks: list[str]
    ranks: dict[str, int]  # module -> rank
    resident: dict[str, torch.Tensor]  # slot -> float32 values
    per_task: dict[str, dict[str, torch.Tensor]]  # task -> slot -> values (float32)
    stored: dict[str, dict[str, StoredFactor]] = field(default_factory=dict)  # task -> slot -> bank encoding

    @property
    def switchable(self) -> list[str]:
        first = next(iter(self.per_task.values()), {})
        return list(first)

    def slot_shape(self, slot: str) -> tuple[int, ...]:
        if slot in self.resident:
            return tuple(self.resident[slot].shape)
        return tuple(next(iter(self.per_task.values()))[slot].shape)

    def task_factors(self, task: str) -> dict[str, LoraFactors]:
        """The effective adapter a runtime computes for ``task`` (for PyTorch references)."""
        values = {**self.resident, **self.per_task[task]}
        return {m: LoraFactors(values[f"{m}.{SLOT_A}"], values[f"{m}.{SLOT_B}"]) for m in self.ranks}


def layout_from_bank(bank: MergedBank) -> SlotLayout:
    """Resident where one factor serves all tasks, switchable otherwise (see ``MergedModule``)."""
    ranks: dict[str, int] = {}
    resident: dict[str, torch.Tensor] = {}
    per_task: dict[str, dict[str, torch.Tensor]] = {t: {} for t in bank.tasks}
    stored: dict[str, dict[str, StoredFactor]] = {t: {} for t in bank.tasks}
    for module, m in bank.modules.items():
        if m.rank == 0:
            continue
        ranks[module] = m.rank
        for slot, factors, index, shared in (
            (SLOT_A, m.A, m.a_index, m.a_shared()),
            (SLOT_B, m.B, m.b_index, m.b_shared()),
        ):
            name = f"{module}.{slot}"
            if shared:
                resident[name] = factors[0].values()
            else:
                values = [f.values() for f in factors]
                for t, task in enumerate(bank.tasks):
                    per_task[task][name] = values[index[t]]
                    stored[task][name] = factors[index[t]]
    return SlotLayout(list(bank.tasks), ranks, resident, per_task, stored)


class LoraSlotLinear(nn.Module):
    """``y = base(x) + B (A x)``; ``lora_a`` (r, d_in) and ``lora_b`` (d_out, r) are buffers.

    Switchable slots start at zero (the base model) in ``switch_dtype``; the product is computed in
    the activation dtype.
    """

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer(SLOT_A, a)
        self.register_buffer(SLOT_B, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_a.to(x.dtype)
        b = self.lora_b.to(x.dtype)
        return self.base(x) + nn.functional.linear(nn.functional.linear(x, a), b)


def attach_slots(model: nn.Module, layout: SlotLayout, switch_dtype: torch.dtype) -> list[str]:
    """Replace every target Linear of ``model`` in place; returns the switchable buffers' names."""
    for module, rank in layout.ranks.items():
        base = model.get_submodule(module)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"module {module!r} is a {type(base).__name__}, not a Linear")
        slots = []
        for slot, shape in ((SLOT_A, (rank, base.in_features)), (SLOT_B, (base.out_features, rank))):
            name = f"{module}.{slot}"
            if name in layout.resident:
                value = layout.resident[name].float().clone()
            else:
                value = torch.zeros(shape, dtype=switch_dtype)
            if tuple(value.shape) != shape:
                raise ValueError(f"slot {name}: bank shape {tuple(value.shape)} does not fit the model's {shape}")
            slots.append(value)
        parent_name, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoraSlotLinear(base, *slots))
    return layout.switchable


def merge_into(model: nn.Module, adapter: dict[str, LoraFactors]) -> None:
    """Fold one adapter into the base weights (the "one model per task" deployment)."""
    with torch.no_grad():
        for module, f in adapter.items():
            linear = model.get_submodule(module)
            linear.weight += (f.B @ f.A).to(linear.weight.dtype)
