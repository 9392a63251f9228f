"""The budgeted methods' build (hydraopt, per-task): every module's candidates once (they do not
depend on the budget), one allocation per budget, then the chosen modules.

Budgets are file bytes (storage.py): the allocator gets the budget less the bound on every file's
fixed overhead (the shared file and one per task, each header priced with a payload of the
budget's number of digits), so every bank's files fit its budget.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hydraopt_mobile.adapters import AdapterSet
from hydraopt_mobile.calibration import Calibration
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.merge.allocator import Candidate, allocate_best, minimum_bytes
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.candidates import HydraOptConfig, build_modules, plan_candidates, task_weights
from hydraopt_mobile.merge.spill import StoredASpill
from hydraopt_mobile.merge.method import MethodParams, Modules, NoParams, OnStep, Storage, param
from hydraopt_mobile.storage import file_overhead_bound


@dataclass(frozen=True)
class HydraOptParams(MethodParams):
    k_a: int | None = param(None, "fix the number of A-groups", min=1)
    k_b: int | None = param(None, "fix the number of B-groups", min=1)
    rank: int | None = param(None, "fix the shared rank r'", min=1)


def build_hydraopt(adapters: AdapterSet, params: HydraOptParams, storage: Storage, on_step: OnStep | None, calibration: Calibration | None = None) -> list[Modules | InfeasibleBudget]:
    """Shared factors + per-task tensors: the layout, rank and format of each module chosen under
    each budget (with ``calibration``, by the data-aware objective)."""
    T = len(adapters.tasks)
    for name in ("k_a", "k_b"):
        k = getattr(params, name)
        if k is not None and k > T:
            raise UserError(f"--param {name}={k}: at most the number of tasks ({T})")
    cfg = HydraOptConfig(formats=storage.formats, k_a=params.k_a, k_b=params.k_b, rank=params.rank, calibration=calibration)
    return _build(adapters, cfg, storage, on_step)


def build_per_task(adapters: AdapterSet, params: NoParams, storage: Storage, on_step: OnStep | None, calibration: Calibration | None = None) -> list[Modules | InfeasibleBudget]:
    """Each adapter compressed on its own (rank and format per module) under each budget; nothing shared."""
    return _build(adapters, HydraOptConfig(formats=storage.formats, per_task=True, calibration=calibration), storage, on_step)


def _build(adapters: AdapterSet, cfg: HydraOptConfig, storage: Storage, on_step: OnStep | None) -> list[Modules | InfeasibleBudget]:
    with tempfile.TemporaryDirectory(prefix="hydraopt-merge-") as tmp:
        spill = StoredASpill(Path(tmp))
        weights = task_weights(adapters, cfg.calibration)
        candidates = plan_candidates(adapters, cfg, on_step, spill, weights)
        reference = adapters.reference_file_bytes()
        plans = [plan_budget(candidates, budget, reference, len(adapters.tasks)) for budget in storage.budgets]
        feasible = [i for i, p in enumerate(plans) if not isinstance(p, InfeasibleBudget)]
        built = iter(build_modules(adapters, cfg, [plans[i] for i in feasible], on_step, keep=lambda j, *rest: storage.keep(feasible[j], *rest), spill=spill, weights=weights))
        return [p if isinstance(p, InfeasibleBudget) else next(built) for p in plans]


def plan_options(n_tasks: int) -> tuple[Callable[[Candidate], bool], ...]:
    """The candidate subsets a budget's plan is chosen among (allocator.allocate_best), the first
    preferred on a tie: the layouts that share no factor (each task compressed on its own), then
    every candidate. So a plan shares a factor only where that lowers the objective below the best
    plan without sharing that the planner finds from the same measured candidates."""
    return (lambda c: c.k_a == c.k_b == n_tasks, lambda c: True)


def payload_budget(nbytes: int, n_tasks: int) -> int:
    """The bytes a budget of ``nbytes`` file bytes leaves for the factors: less the bound on the
    fixed overhead of the shared file and one file per task."""
    return nbytes - (n_tasks + 1) * file_overhead_bound(len(str(nbytes)))


def plan_budget(candidates: dict[str, list[Candidate]], budget: Budget, reference: int, n_tasks: int) -> dict[str, Candidate] | InfeasibleBudget:
    """The chosen candidate per module, or the error naming the smallest feasible budget."""
    nbytes = budget.resolve(reference)
    try:
        return allocate_best(candidates, payload_budget(nbytes, n_tasks), plan_options(n_tasks))
    except InfeasibleBudget:
        payload = minimum_bytes(candidates)
        smallest = payload + (n_tasks + 1) * file_overhead_bound(len(str(payload)))
        smallest = payload + (n_tasks + 1) * file_overhead_bound(len(str(smallest)))  # its own digits price the headers
        return InfeasibleBudget(
            f"--budget {budget.label()} ({nbytes:,} bytes) is infeasible: the smallest feasible budget is "
            f"{smallest:,} bytes ({smallest / reference:.4f} of fp16 one-adapter-per-task, in file bytes)"
        )
