"""The ``hydraopt`` merge: candidate layouts per module, solved in factored space, planned under a budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..adapters import AdapterSet, LoraFactors
from ..bank import MergedModule
from ..factored import factor_space, sq_norm
from ..formats import NumberFormat
from .grouping import cluster, row_space_similarity, update_cosine
from .hydraopt import LayoutSolution, fit_stored, solve_layout
from .planner import Candidate, plan


@dataclass(frozen=True)
class HydraOptConfig:
    """What the planner may choose from."""

    formats: tuple[NumberFormat, ...]
    rank_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0)
    k_a: int | None = None  # fix the number of A-groups (None: the planner chooses)
    k_b: int | None = None
    rank: int | None = None  # fix r'
    max_iters: int = 25


def group_counts(T: int) -> list[int]:
    """1, 2, 4, ... below T, then T: the rungs between one shared factor and one per task."""
    ks, k = [], 1
    while k < T:
        ks.append(k)
        k *= 2
    return ks + [T]


def candidate_layouts(T: int, cfg: HydraOptConfig) -> list[tuple[int, int]]:
    """(k_A, k_B) pairs with k_A <= k_B: the path from one merged adapter through one shared A
    (a B per task) to one adapter per task. A's are the more alike factor (METHOD.md), so they are
    the ones shared first."""
    ks = group_counts(T)
    layouts = [(1, k) for k in ks] + [(k, T) for k in ks[1:]]
    if cfg.k_a is not None:
        layouts = [lay for lay in layouts if lay[0] == cfg.k_a] or [(cfg.k_a, cfg.k_b or T)]
    if cfg.k_b is not None:
        layouts = [lay for lay in layouts if lay[1] == cfg.k_b] or [(cfg.k_a or 1, cfg.k_b)]
    return list(dict.fromkeys(layouts))


def task_weights(adapters: AdapterSet) -> torch.Tensor:
    """w_t = 1 / ||dW_t||^2 summed over modules, so the objective is the sum of squared relative errors."""
    totals = torch.zeros(len(adapters.tasks), dtype=torch.float64)
    for name in adapters.module_names:
        for t, f in enumerate(adapters.factors(name)):
            totals[t] += sq_norm(f)
    return 1.0 / totals.clamp_min(1e-30)


class ModulePlanner:
    """Candidates of one module, and the rebuild of the chosen one."""

    def __init__(self, factors: list[LoraFactors], weights: torch.Tensor, cfg: HydraOptConfig):
        self.fm, self.w, self.cfg = factor_space(factors), weights, cfg
        self._a_sim, self._b_sim = row_space_similarity(self.fm), update_cosine(self.fm)
        r_max, q = max(f.rank for f in factors), self.fm.Q.shape[1]
        ranks = [cfg.rank] if cfg.rank else sorted({max(1, min(q, round(m * r_max))) for m in cfg.rank_multipliers})
        self.specs = [(ka, kb, r) for ka, kb in candidate_layouts(self.fm.n_tasks, cfg) for r in ranks]

    def _solve(self, k_a: int, k_b: int, rank: int) -> LayoutSolution:
        groups = cluster(self._a_sim, k_a), cluster(self._b_sim, k_b)
        return solve_layout(self.fm, self.w, *groups, rank, max_iters=self.cfg.max_iters)

    def candidates(self) -> list[Candidate]:
        out = []
        for k_a, k_b, r in self.specs:
            sol = self._solve(k_a, k_b, r)
            for fmt in self.cfg.formats:
                module, err = fit_stored(self.fm, self.w, sol, fmt)
                out.append(Candidate(k_a, k_b, r, fmt.label(), module.nbytes(), float(err.sum())))
        return out

    def build(self, c: Candidate) -> MergedModule:
        return fit_stored(self.fm, self.w, self._solve(c.k_a, c.k_b, c.rank), NumberFormat.parse(c.fmt))[0]


def plan_candidates(adapters: AdapterSet, cfg: HydraOptConfig, tick: Callable[[], None] | None = None) -> dict[str, list[Candidate]]:
    """Every module's candidates (reusable across budgets). Module state is dropped after each
    module, so memory stays at one module's factored space."""
    w = task_weights(adapters)
    cands = {}
    for name in adapters.module_names:
        cands[name] = ModulePlanner(adapters.factors(name), w, cfg).candidates()
        if tick:
            tick()
    return cands


def build_modules(adapters: AdapterSet, cfg: HydraOptConfig, cands: dict[str, list[Candidate]], budget_bytes: int, tick: Callable[[], None] | None = None) -> dict[str, MergedModule]:
    """Rebuild each module's chosen candidate (recomputing its factored space: cheaper than keeping it)."""
    w = task_weights(adapters)
    out = {}
    for name, c in plan(cands, budget_bytes).items():
        out[name] = ModulePlanner(adapters.factors(name), w, cfg).build(c)
        if tick:
            tick()
    return out
