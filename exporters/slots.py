"""LoRA slots: a Hugging Face causal LM whose target Linears compute ``W x + B (A x)``.

A merged bank says, per module, whether its A and its B are shared by every task (then the export
keeps them *resident*, baked into the graph) or differ between tasks (then they are *switchable*:
an fp32 slot the runtime fills from a per-task file). Both back ends use the same wrapped model;
they differ only in how a switchable slot is filled (ExecuTorch: mutable buffers written by a
``set_task`` method; ONNX Runtime: graph inputs with zero defaults). Task files keep the bank's
number format, so the bank's storage saving reaches the device; they are decoded to fp32 once,
when a task is loaded (ONNX: by the small :class:`TaskDecoder` graph), never per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hydraopt_mobile.adapters import LoraFactors
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.formats import StoredFactor, dequantize

SLOT_A = "lora_a"
SLOT_B = "lora_b"


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


class EncodedSlot(nn.Module):
    """A switchable factor in the bank's encoding, decoded to its fp32 slot (ONNX task decoder).

    Buffers hold the component vectors (rows of A, columns of B) as :meth:`StoredFactor.codes`
    gives them: ``w`` (n, length) fp16, or ``q`` (n, padded) int8 codes with ``scale`` (n, groups)
    fp16 (int4 codes one per byte because ONNX Runtime has no int4 graph inputs for adapters).
    All zero: the base model.
    """

    def __init__(self, factor: StoredFactor) -> None:
        super().__init__()
        self.length = factor.vectors_shape[1]
        self.transposed = factor.transposed
        for name, codes in factor.codes().items():
            self.register_buffer(name, torch.zeros_like(codes))

    def forward(self) -> torch.Tensor:
        v = dequantize(dict(self.named_buffers()), self.length)
        return v.T if self.transposed else v


class LoraSlotLinear(nn.Module):
    """``y = base(x) + B (A x)``; ``lora_a`` (r, d_in) and ``lora_b`` (d_out, r) are fp32 buffers:
    resident values, or switchable slots (zero until a task fills them)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer(SLOT_A, a)
        self.register_buffer(SLOT_B, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + nn.functional.linear(nn.functional.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))


def attach_slots(model: nn.Module, layout: SlotLayout) -> dict[str, tuple[int, ...]]:
    """Replace every target Linear of ``model`` in place; returns the switchable slots and shapes."""
    switchable: dict[str, tuple[int, ...]] = {}
    for module, rank in layout.ranks.items():
        base = model.get_submodule(module)
        if not isinstance(base, nn.Linear):
            raise UserError(f"module {module!r} is a {type(base).__name__} in the base model, not a Linear: the bank was merged for another model")
        slots: list[torch.Tensor] = []
        for slot, shape in ((SLOT_A, (rank, base.in_features)), (SLOT_B, (base.out_features, rank))):
            name = f"{module}.{slot}"
            bank_shape = layout.slot_shape(name)
            if bank_shape != shape:
                raise UserError(f"slot {name}: bank shape {bank_shape} does not fit the base model's {shape}: the bank was merged for another model")
            if name in layout.resident:
                slots.append(layout.resident[name].float().clone())
            else:
                switchable[name] = shape
                slots.append(torch.zeros(shape))
        parent_name, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoraSlotLinear(base, *slots))
    return switchable


class TaskDecoder(nn.Module):
    """Every switchable slot decoded from a task file's tensors (the bank's encoding) to fp32.

    Exported as its own small graph: a runtime runs it once per task load and feeds the outputs to
    the decoder step, so no decoding happens per token. Buffers are named ``slots.<i>.<code>``;
    :meth:`input_names` maps them to the task-file tensor names.
    """

    def __init__(self, layout: SlotLayout) -> None:
        super().__init__()
        first = layout.stored[layout.tasks[0]]
        self.slot_names = sorted(first)
        self.slots = nn.ModuleList(EncodedSlot(first[name]) for name in self.slot_names)

    def input_names(self) -> dict[str, str]:
        return {f"slots.{i}.{code}": f"{name}.{code}" for i, name in enumerate(self.slot_names)
                for code, _ in self.slots[i].named_buffers()}

    def forward(self) -> tuple[torch.Tensor, ...]:
        return tuple(slot() for slot in self.slots)


def task_graph_tensors(layout: SlotLayout, task: str) -> dict[str, torch.Tensor]:
    """What an ONNX task file feeds: every switchable slot of ``task`` as its codes (:class:`EncodedSlot`)."""
    return {f"{slot}.{k}": v for slot, f in layout.stored[task].items() for k, v in f.codes().items()}


def merge_into(model: nn.Module, adapter: dict[str, LoraFactors]) -> None:
    """Fold one adapter into the base weights (the "one model per task" deployment)."""
    with torch.no_grad():
        for module, f in adapter.items():
            linear = model.get_submodule(module)
            linear.weight += (f.B @ f.A).to(linear.weight.dtype)
