"""Baseline merges: every task served by one merged adapter of rank r (or the inputs kept as is).

Following METHOD.md, each baseline merges in dW space and is re-factorised to a LoRA of rank
``rank`` (default: the largest input rank) by truncated SVD, which gives every baseline the same
storage. The merge rules themselves are PEFT's (``peft.utils.merge_utils``), on stacked dense
updates of one module at a time: TIES and DARE are elementwise rules, so they need the dense
d_out x d_in updates (unlike HydraOpt, which never forms them).
"""

from __future__ import annotations

import importlib

import torch

from hydraopt_mobile.adapters import AdapterSet, LoraFactors
from hydraopt_mobile.bank import MergedModule, grouped_module, single_adapter_module
from hydraopt_mobile.formats import NumberFormat


def _rules():
    """PEFT's merge rules, imported on first use (importing peft pulls in torchao: seconds of start-up)."""
    return importlib.import_module("peft.utils.merge_utils")


def refactorize(delta: torch.Tensor, rank: int) -> LoraFactors:
    """Truncated SVD of a dense update into LoRA factors, as PEFT's ``svd`` combination does
    (``B = U_r S_r``, ``A = Vh_r``)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, S.numel())
    return LoraFactors(Vh[:rank].float().contiguous(), (U[:, :rank] * S[:rank]).float().contiguous())


def dense_updates(factors: list[LoraFactors]) -> list[torch.Tensor]:
    return [f.dense() for f in factors]


def _weights(params: dict, n: int, key: str = "weight") -> torch.Tensor:
    return torch.full((n,), float(params[key]))


def task_arithmetic(factors: list[LoraFactors], params: dict) -> torch.Tensor:
    """lambda * sum_t dW_t (Ilharco et al. 2023)."""
    return _rules().task_arithmetic(dense_updates(factors), _weights(params, len(factors)))


def svd_merge(factors: list[LoraFactors], params: dict) -> torch.Tensor:
    """PEFT ``add_weighted_adapter(combination_type='svd')``: sum_t w_t dW_t, w_t = 1/T by default."""
    w = params.get("weight") or 1.0 / len(factors)
    return _rules().task_arithmetic(dense_updates(factors), torch.full((len(factors),), float(w)))


def ties(factors: list[LoraFactors], params: dict) -> torch.Tensor:
    return _rules().ties(dense_updates(factors), _weights(params, len(factors)), params["density"], params["majority_sign"])


def dare_linear(factors: list[LoraFactors], params: dict) -> torch.Tensor:
    torch.manual_seed(int(params["seed"]))
    return _rules().dare_linear(dense_updates(factors), _weights(params, len(factors)), params["density"])


def dare_ties(factors: list[LoraFactors], params: dict) -> torch.Tensor:
    torch.manual_seed(int(params["seed"]))
    return _rules().dare_ties(
        dense_updates(factors), _weights(params, len(factors)), params["density"], params["majority_sign"]
    )


def knots(factors: list[LoraFactors], params: dict) -> torch.Tensor:
    """KnOTS (Stoica et al. 2025): one SVD of the side-by-side updates [dW_1 ... dW_T] = U S [V_1^T ... V_T^T]
    aligns the tasks in a shared basis U S; the per-task V_t are merged with TIES; dW = U S V_merged^T."""
    deltas = dense_updates(factors)
    d_in = deltas[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(deltas, dim=1).double(), full_matrices=False)
    keep = int((S > S[0] * 1e-7).sum()) if S.numel() and S[0] > 0 else 0
    U, S, Vh = U[:, :keep], S[:keep], Vh[:keep]
    per_task_v = [Vh[:, t * d_in : (t + 1) * d_in].float() for t in range(len(deltas))]
    v_merged = _rules().ties(per_task_v, _weights(params, len(deltas)), params["density"], params["majority_sign"])
    return ((U * S) @ v_merged.double()).float()


def merged_module(rule, factors: list[LoraFactors], params: dict, fmt: NumberFormat) -> MergedModule:
    """Apply a dense merge ``rule`` to one module and store the rank-``rank`` re-factorisation."""
    rank = int(params.get("rank") or max(f.rank for f in factors))
    return single_adapter_module(refactorize(rule(factors, params), rank), len(factors), fmt)


def concatenate(factors: list[LoraFactors], params: dict, fmt: NumberFormat) -> MergedModule:
    """PEFT's ``cat``: A = [A_1; ...; A_T], B = [w B_1, ..., w B_T]; exact sum, rank sum r_t."""
    w = params.get("weight") or 1.0 / len(factors)
    A = torch.cat([f.A for f in factors], dim=0)
    B = torch.cat([f.B * w for f in factors], dim=1)
    return single_adapter_module(LoraFactors(A, B), len(factors), fmt)


def one_per_task(factors: list[LoraFactors], params: dict, fmt: NumberFormat) -> MergedModule:
    """The reference: every task keeps its own A and B (k_A = k_B = T)."""
    T = len(factors)
    return grouped_module(factors[0].shape, list(range(T)), list(range(T)), [f.A for f in factors], [f.B for f in factors], fmt)


def merge_modules(adapters: AdapterSet, build, params: dict, fmt: NumberFormat, progress=None) -> dict[str, MergedModule]:
    out = {}
    for name in adapters.module_names:
        out[name] = build(adapters.factors(name), params, fmt)
        if progress is not None:
            progress()
    return out
