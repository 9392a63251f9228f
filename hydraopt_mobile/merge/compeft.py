"""ComPEFT (Yadav et al., arXiv 2311.13171) as a per-task compression method: each task's update is
sparsified to its largest-magnitude entries and stored as their signs times one scale.

It runs in factored space: what is sparsified is each task's LoRA factors A_t and B_t (the PEFT
parameters ComPEFT compresses), never a dense d_out x d_in update. Each factor keeps the
``ceil(density * n)`` largest of its ``n`` values as signs (formats.py, ``sign``: bitmask or
positions, whichever is smaller, plus one sign bit per kept value). The two scales are set so the
product is the least-squares fit of the task's update: A's is the mean magnitude of its kept
values, and B's makes ``c = <dW_t, S_B S_A> / ||S_B S_A||^2`` (S: the sign matrices), computed from
r x r traces (factored.py). Differences from the paper: no task-vector-from-initialisation (an
adapter file does not carry its initialisation) and a least-squares scale rather than one tuned on
validation data (``alpha * std``), so the method needs no data.

One density for every factor: given (``--param density``), or the largest whose files fit the
budget (file bytes, storage.py), found by bisection on the exact safetensors sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hydraopt_mobile.adapters import AdapterSet, LoraFactors
from hydraopt_mobile.bank import MergedModule, with_sq_errors
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.factored import inner, sq_norm
from hydraopt_mobile.formats import NumberFormat, StoredFactor
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.method import MethodParams, Modules, OnStep, Storage, each_module, param
from hydraopt_mobile.storage import factor_specs, safetensors_bytes


@dataclass(frozen=True)
class ComPeftParams(MethodParams):
    density: float | None = param(None, "fraction of each factor's values kept (default: the largest that fits --budget)", min=1e-6, max=1.0)


def compress_module(factors: list[LoraFactors], fmt: NumberFormat) -> MergedModule:
    """Every task's A and B as signs in ``fmt`` (k_A = k_B = T), scaled for the least-squares product."""
    A: list[StoredFactor] = []
    B: list[StoredFactor] = []
    for f in factors:
        a = StoredFactor.encode(f.A.float(), fmt, transposed=False)
        b = StoredFactor.encode(f.B.float(), fmt, transposed=True)
        if f.rank:
            signs = LoraFactors(a.values(), b.values())
            norm = sq_norm(signs)
            scale_b = inner(f, signs) / norm * float(b.data["z"][0, :2].view(torch.float16)) if norm > 0 else 0.0
            b.data["z"][0, :2] = torch.tensor([scale_b], dtype=torch.float16).view(torch.uint8)
        A.append(a)
        B.append(b)
    T = len(factors)
    return MergedModule(shape=factors[0].shape, a_index=list(range(T)), b_index=list(range(T)), A=A, B=B)


def file_bytes_at(adapters: AdapterSet, density: float) -> int:
    """File bytes of the bundle ComPEFT writes at ``density`` (known from shapes alone)."""
    fmt = NumberFormat("sign", density=density)
    total = 0
    for t in range(len(adapters.tasks)):
        specs = []
        for m, name in enumerate(adapters.module_names):
            f = adapters.factors(name)[t]
            d_out, d_in = f.shape
            specs += factor_specs(m, "A", None, fmt, f.rank, d_in) + factor_specs(m, "B", None, fmt, f.rank, d_out)
        total += safetensors_bytes(specs) if specs else 0
    return total


def density_for(adapters: AdapterSet, budget: Budget) -> float | InfeasibleBudget:
    """The largest density (to 1e-6) whose files fit ``budget``, or why none does."""
    nbytes = budget.resolve(adapters.reference_file_bytes())
    low, high = 1e-6, 1.0
    if file_bytes_at(adapters, low) > nbytes:
        smallest = file_bytes_at(adapters, low)
        return InfeasibleBudget(
            f"--budget {budget.label()} ({nbytes:,} bytes) is infeasible for compeft: one kept value per factor takes "
            f"{smallest:,} bytes ({smallest / adapters.reference_file_bytes():.4f} of fp16 one-adapter-per-task)"
        )
    if file_bytes_at(adapters, high) <= nbytes:
        return high
    while high - low > 1e-6:
        mid = (low + high) / 2
        low, high = (mid, high) if file_bytes_at(adapters, mid) <= nbytes else (low, mid)
    return low


def build_compeft(adapters: AdapterSet, params: ComPeftParams, storage: Storage, on_step: OnStep | None) -> list[Modules | InfeasibleBudget]:
    """Per budget, every task's factors sparsified to signs at one density."""
    if len(storage.formats) == 1:
        raise UserError("--format does not apply to compeft: it stores signs (choose the size with --budget or --param density)")
    out: list[Modules | InfeasibleBudget] = []
    for i, budget in enumerate(storage.budgets):
        density = params.density if params.density is not None else density_for(adapters, budget)
        if isinstance(density, InfeasibleBudget):
            out.append(density)
            continue
        nbytes, limit = file_bytes_at(adapters, density), budget.resolve(adapters.reference_file_bytes())
        if nbytes > limit:
            out.append(InfeasibleBudget(f"--param density={density}: {nbytes:,} file bytes exceed --budget {budget.label()} ({limit:,} bytes)"))
            continue
        fmt = NumberFormat("sign", density=density)
        out.append(each_module(adapters, lambda _, __, factors: with_sq_errors(factors, compress_module(factors, fmt)), on_step, then=lambda _, name, factors, module: storage.keep(i, name, factors, module)))
    return out
