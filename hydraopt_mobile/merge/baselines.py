"""Baseline merges: every task served by one merged adapter of rank r (or the inputs kept as is).

Following METHOD.md, each baseline merges in dW space and is re-factorised to a LoRA of rank
``rank`` (default: the largest input rank) by truncated SVD, which gives every baseline the same
storage. The merge rules themselves are PEFT's (``peft.utils.merge_utils``), on stacked dense
updates of one module at a time: TIES and DARE are elementwise rules, so they need the dense
d_out x d_in updates (unlike HydraOpt, which never forms them).

Each rule takes the module's factors and its method's typed parameters (the dataclasses below) and
returns the merged dense update; :func:`dense_rule` makes a rule a registry build, :func:`per_module`
does the same for a rule that stores factors directly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Literal, TypeVar

import torch

from hydraopt_mobile.adapters import AdapterSet, LoraFactors
from hydraopt_mobile.bank import MergedModule, grouped_module, single_adapter_module
from hydraopt_mobile.formats import NumberFormat
from hydraopt_mobile.merge.budget import InfeasibleBudget
from hydraopt_mobile.merge.method import Build, MethodParams, Modules, OnStep, Storage, each_module, param

Sign = Literal["total", "frequency"]
_SIGN_HELP = "TIES sign election: total or frequency"
_RANK_HELP = "rank of the merged adapter (default: largest input rank)"
_SEED_HELP = "random seed of DARE's drop mask"
_MEAN_HELP = "weight per task (default 1/T)"


@dataclass(frozen=True)
class TaskArithmeticParams(MethodParams):
    weight: float = param(0.3, "lambda")
    rank: int | None = param(None, _RANK_HELP, min=1)


@dataclass(frozen=True)
class TiesParams(MethodParams):
    weight: float = param(1.0, "weight of every task's update")
    density: float = param(0.2, "fraction of values kept per task", min=0, max=1)
    majority_sign: Sign = param("total", _SIGN_HELP)
    rank: int | None = param(None, _RANK_HELP, min=1)


@dataclass(frozen=True)
class DareLinearParams(MethodParams):
    weight: float = param(0.3, "lambda")
    density: float = param(0.5, "keep probability", min=0, max=1)
    seed: int = param(0, _SEED_HELP)
    rank: int | None = param(None, _RANK_HELP, min=1)


@dataclass(frozen=True)
class DareTiesParams(MethodParams):
    weight: float = param(1.0, "weight of every task's update")
    density: float = param(0.5, "keep probability", min=0, max=1)
    majority_sign: Sign = param("total", _SIGN_HELP)
    seed: int = param(0, _SEED_HELP)
    rank: int | None = param(None, _RANK_HELP, min=1)


@dataclass(frozen=True)
class SvdParams(TaskArithmeticParams):
    weight: float | None = param(None, _MEAN_HELP)  # type: ignore[assignment]


@dataclass(frozen=True)
class KnotsParams(TiesParams):
    density: float = param(0.5, "TIES density on V", min=0, max=1)


@dataclass(frozen=True)
class CatParams(MethodParams):
    weight: float | None = param(None, _MEAN_HELP)


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


def _weights(weight: float | None, n: int) -> torch.Tensor:
    """Every task's weight: ``weight``, or 1/n when None (a plain mean)."""
    return torch.full((n,), float(1.0 / n if weight is None else weight))


def _seeded(seed: int, rule: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``rule()`` with torch's random generator seeded by ``seed``; the caller's generator state is
    restored afterwards (PEFT's DARE draws its mask from the global generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return rule()


def task_arithmetic(factors: list[LoraFactors], p: TaskArithmeticParams) -> torch.Tensor:
    """sum_t w_t dW_t: lambda * sum (Ilharco et al. 2023), or PEFT ``add_weighted_adapter(
    combination_type='svd')`` with w_t = 1/T by default."""
    return _rules().task_arithmetic(dense_updates(factors), _weights(p.weight, len(factors)))


def ties(factors: list[LoraFactors], p: TiesParams) -> torch.Tensor:
    return _rules().ties(dense_updates(factors), _weights(p.weight, len(factors)), p.density, p.majority_sign)


def dare_linear(factors: list[LoraFactors], p: DareLinearParams) -> torch.Tensor:
    return _seeded(p.seed, lambda: _rules().dare_linear(dense_updates(factors), _weights(p.weight, len(factors)), p.density))


def dare_ties(factors: list[LoraFactors], p: DareTiesParams) -> torch.Tensor:
    return _seeded(p.seed, lambda: _rules().dare_ties(dense_updates(factors), _weights(p.weight, len(factors)), p.density, p.majority_sign))


def knots(factors: list[LoraFactors], p: KnotsParams) -> torch.Tensor:
    """KnOTS (Stoica et al. 2025): one SVD of the side-by-side updates [dW_1 ... dW_T] = U S [V_1^T ... V_T^T]
    aligns the tasks in a shared basis U S; the per-task V_t are merged with TIES; dW = U S V_merged^T."""
    deltas = dense_updates(factors)
    d_in = deltas[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(deltas, dim=1).double(), full_matrices=False)
    keep = int((S > S[0] * 1e-7).sum()) if S.numel() and S[0] > 0 else 0
    U, S, Vh = U[:, :keep], S[:keep], Vh[:keep]
    per_task_v = [Vh[:, t * d_in : (t + 1) * d_in].float() for t in range(len(deltas))]
    v_merged = _rules().ties(per_task_v, _weights(p.weight, len(deltas)), p.density, p.majority_sign)
    return ((U * S) @ v_merged.double()).float()


def concatenate(factors: list[LoraFactors], p: CatParams, fmt: NumberFormat) -> MergedModule:
    """PEFT's ``cat``: A = [A_1; ...; A_T], B = [w B_1, ..., w B_T]; exact sum, rank sum r_t."""
    w = 1.0 / len(factors) if p.weight is None else p.weight
    A = torch.cat([f.A for f in factors], dim=0)
    B = torch.cat([f.B * w for f in factors], dim=1)
    return single_adapter_module(LoraFactors(A, B), len(factors), fmt)


def as_is(factors: list[LoraFactors], fmt: NumberFormat) -> MergedModule:
    """Every task keeps its own A and B at its own rank (k_A = k_B = T), stored in ``fmt``."""
    T = len(factors)
    return grouped_module(factors[0].shape, list(range(T)), list(range(T)), [f.A for f in factors], [f.B for f in factors], fmt)


def one_per_task(factors: list[LoraFactors], p: MethodParams, fmt: NumberFormat) -> MergedModule:
    """The reference: the inputs as they are."""
    return as_is(factors, fmt)


P = TypeVar("P", bound=MethodParams)
ModuleRule = Callable[[list[LoraFactors], P, NumberFormat], MergedModule]


def per_module(rule: ModuleRule) -> Build:
    """A fixed-storage build that stores ``rule(factors, params, fmt)`` for every module."""

    def build(adapters: AdapterSet, params: MethodParams, storage: Storage, on_step: OnStep | None) -> list[Modules | InfeasibleBudget]:
        (fmt,) = storage.formats
        return [each_module(adapters, lambda _, __, factors: rule(factors, params, fmt), on_step)]

    return build


def dense_rule(rule: Callable[[list[LoraFactors], P], torch.Tensor]) -> Build:
    """A build that merges each module's dense updates with ``rule`` and stores the rank-``rank``
    re-factorisation as one adapter for every task."""

    def merged_module(factors: list[LoraFactors], p: P, fmt: NumberFormat) -> MergedModule:
        rank = p.rank or max(f.rank for f in factors)  # type: ignore[attr-defined]
        return single_adapter_module(refactorize(rule(factors, p), rank), len(factors), fmt)

    return per_module(merged_module)
