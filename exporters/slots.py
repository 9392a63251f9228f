"""LoRA slots: a Hugging Face causal LM whose target Linears compute ``W x + B (A x)``.

A program is a function of (base model, quantisation, slot *signature*) only. The signature lists
the modules with a LoRA slot and each one's rank ``R``; every slot (``<module>.lora_a`` (R, d_in),
``<module>.lora_b`` (d_out, R)) is runtime data, zero in the program (the base model). Which factors
a bank shares is data too: a runtime decodes the bank's shared file once and a task's file on each
load (``exporters/targets/device_runner.py: BankSlots``), and writes every slot on a switch. So one
program serves every bank whose modules are in its signature with ranks up to the signature's: a
factor of smaller rank is padded with zero components, which leaves ``B A`` unchanged.

Slot spec syntax (``hydraopt export --slots``): comma-separated module names, each optionally
followed by ``:RANK``; a name without a rank takes the rank of the next name that has one. A name
matches every Linear of the base model whose path equals it or ends with ``.NAME``, so
``q_proj,v_proj:16`` gives q_proj and v_proj of every layer rank 16, and ``q_proj:16,v_proj:8``
gives them ranks 16 and 8.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from hydraopt_mobile.adapters import LoraFactors
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.errors import UserError

SLOT_A = "lora_a"
SLOT_B = "lora_b"
_SPEC_ITEM = re.compile(r"^([A-Za-z0-9_.]+)(?::([0-9]+))?$")


def bank_signature(bank: MergedBank) -> dict[str, int]:
    """The smallest signature that serves ``bank``: its modules with a non-zero rank, at their largest rank."""
    return {name: m.largest_rank for name, m in bank.modules.items() if m.largest_rank > 0}


def parse_slot_spec(spec: str, model: nn.Module) -> dict[str, int]:
    """``--slots SPEC`` (module docstring) resolved against ``model``'s Linears: module -> rank."""
    return resolve_slot_spec(spec, [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)], "no Linear of the base model")


def resolve_slot_spec(spec: str, modules: list[str], where: str) -> dict[str, int]:
    """``--slots SPEC`` resolved against the module paths ``modules`` (``where`` names them in the
    error for a name that matches none): module -> rank, in ``modules``' order."""
    items, pending = [], []
    for raw in spec.split(","):
        match = _SPEC_ITEM.match(raw.strip())
        if not match:
            raise UserError(f"--slots {spec!r}: {raw.strip()!r} is not NAME or NAME:RANK (e.g. q_proj,v_proj:16)")
        pending.append(match.group(1))
        if match.group(2) is not None:
            rank = int(match.group(2))
            if rank < 1:
                raise UserError(f"--slots {spec!r}: rank of {match.group(1)!r} must be at least 1")
            items += [(name, rank) for name in pending]
            pending = []
    if pending:
        raise UserError(f"--slots {spec!r}: no rank for {', '.join(pending)} (end the list with NAME:RANK)")
    signature: dict[str, int] = {}
    for name, rank in items:
        found = [m for m in modules if m == name or m.endswith("." + name)]
        if not found:
            raise UserError(f"--slots {spec!r}: {where} is named {name!r}")
        signature.update({m: rank for m in found})
    return {m: signature[m] for m in modules if m in signature}


def check_fits(bank: MergedBank, signature: dict[str, int]) -> None:
    """Refuse a bank with a module outside ``signature`` or of a larger rank, naming the module."""
    for name, rank in bank_signature(bank).items():
        if name not in signature:
            raise UserError(f"bank module {name!r} is not in the program's slot signature (--slots); export with a signature that includes it")
        if rank > signature[name]:
            raise UserError(f"bank module {name!r} has rank {rank}, above the signature's {signature[name]} (--slots)")


def slot_shapes(model: nn.Module, signature: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Every slot of ``signature`` and its fp32 shape in ``model`` (manifest and program order)."""
    shapes: dict[str, tuple[int, int]] = {}
    for module, rank in signature.items():
        base = model.get_submodule(module)
        if not isinstance(base, nn.Linear):
            raise UserError(f"module {module!r} is a {type(base).__name__} in the base model, not a Linear: the bank was merged for another model")
        shapes[f"{module}.{SLOT_A}"] = (rank, base.in_features)
        shapes[f"{module}.{SLOT_B}"] = (base.out_features, rank)
    return shapes


def check_base_model(bank: MergedBank, model: nn.Module) -> None:
    """Refuse a bank whose module shapes are not the base model's (it was merged for another model)."""
    for name, m in bank.modules.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"bank module {name!r} does not exist in the base model: the bank was merged for another model") from None
        if not isinstance(base, nn.Linear) or (base.out_features, base.in_features) != tuple(m.shape):
            raise UserError(f"bank module {name!r}: shape {tuple(m.shape)} does not fit the base model's {type(base).__name__}: the bank was merged for another model")


class LoraSlotLinear(nn.Module):
    """``y = base(x) + B (A x)``; ``lora_a`` (R, d_in) and ``lora_b`` (d_out, R) are fp32 buffers,
    zero in the program (the base model) and written at run time."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.register_buffer(SLOT_A, torch.zeros(rank, base.in_features))
        self.register_buffer(SLOT_B, torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + nn.functional.linear(nn.functional.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))


def attach_slots(model: nn.Module, signature: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Replace every Linear of ``signature`` in ``model`` in place; returns :func:`slot_shapes`."""
    shapes = slot_shapes(model, signature)
    for module, rank in signature.items():
        parent_name, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoraSlotLinear(model.get_submodule(module), rank))
    return shapes


def merge_into(model: nn.Module, adapter: dict[str, LoraFactors]) -> None:
    """Fold one adapter into the base weights (the "one model per task" deployment)."""
    with torch.no_grad():
        for module, f in adapter.items():
            linear = model.get_submodule(module)
            linear.weight += (f.B @ f.A).to(linear.weight.dtype)
