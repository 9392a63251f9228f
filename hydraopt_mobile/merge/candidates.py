"""The candidates of one module for the budgeted methods (hydraopt, per-task): layouts, shared
ranks and number formats, each solved in factored space (solver.py) and priced in file bytes, and
the rebuild of the one the allocator (allocator.py) chose."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from hydraopt_mobile.adapters import AdapterSet, LoraFactors
from hydraopt_mobile.bank import MergedModule, with_sq_errors
from hydraopt_mobile.calibration import Calibration, ModuleMoments
from hydraopt_mobile.factored import b_gram, factor_space, factored_sq_error, sq_norm, stacked_B, whitened
from hydraopt_mobile.formats import NumberFormat
from hydraopt_mobile.merge.allocator import Candidate, lower_hull
from hydraopt_mobile.merge.baselines import as_is
from hydraopt_mobile.merge.grouping import cluster
from hydraopt_mobile.merge.method import ModuleSink, OnStep, each_module
from hydraopt_mobile.merge.solver import LayoutSolution, StoredA, closed_form_errors, fit_stored, fit_to_stored, quantisation_noise, row_spaces, solve_layout, stored_A, stored_error, stored_errors
from hydraopt_mobile.merge.spill import StoredASpill
from hydraopt_mobile.similarity import row_space_overlap, update_cosine


@dataclass(frozen=True)
class HydraOptConfig:
    """What the planner may choose from."""

    formats: tuple[NumberFormat, ...]
    max_rank_multiplier: float = 2.0  # shared ranks go from 1 up to this times the largest input rank
    k_a: int | None = None  # fix the number of A-groups (None: the planner chooses)
    k_b: int | None = None
    rank: int | None = None  # fix r'
    per_task: bool = False  # only k_A = k_B = T: each adapter compressed on its own (rank, format), nothing shared
    max_iters: int = 25
    calibration: Calibration | None = field(default=None, compare=False, repr=False)  # None: the data-free objective

    def moments(self, module: str) -> ModuleMoments | None:
        return None if self.calibration is None else self.calibration.modules[module]


def group_counts(T: int) -> list[int]:
    """1, 2, 4, ... (1, 4, 16, ... above 16 tasks) below T, then T: the rungs between one shared
    factor and one per task."""
    step = 2 if T <= 16 else 4
    ks, k = [], 1
    while k < T:
        ks.append(k)
        k *= step
    return ks + [T]


def candidate_layouts(T: int, cfg: HydraOptConfig) -> list[tuple[int, int]]:
    """(k_A, k_B) pairs with k_A <= k_B: the path from one merged adapter through one shared A
    (a B per task) to one adapter per task. A's are the more alike factor (METHOD.md), so they are
    the ones shared first."""
    if cfg.per_task:
        return [(T, T)]
    ks = group_counts(T)
    layouts = [(1, k) for k in ks] + [(k, T) for k in ks[1:]]
    if cfg.k_a is not None:
        layouts = [lay for lay in layouts if lay[0] == cfg.k_a] or [(cfg.k_a, cfg.k_b or T)]
    if cfg.k_b is not None:
        layouts = [lay for lay in layouts if lay[1] == cfg.k_b] or [(cfg.k_a or 1, cfg.k_b)]
    return list(dict.fromkeys(layouts))


def task_weights(adapters: AdapterSet, calibration: Calibration | None = None) -> torch.Tensor:
    """w_t = 1 / ||dW_t||^2 summed over modules, so the objective is the sum of squared relative
    errors; with calibration 1 / ||dW_t X_t^T||^2 summed over modules (calibration.py)."""
    if calibration is not None:
        return 1.0 / calibration.update_sq_norms(adapters).clamp_min(1e-30)
    totals = torch.zeros(len(adapters.tasks), dtype=torch.float64)
    for name in adapters.module_names:
        for t, f in enumerate(adapters.factors(name)):
            totals[t] += sq_norm(f)
    return 1.0 / totals.clamp_min(1e-30)


AS_IS = 0  # the rank of the candidate that keeps every task's own factors at its own rank


class ModuleCandidates:
    """Candidates of one module, and the rebuild of the chosen one.

    The input adapters as they are (each task at its own rank, in each allowed format) are always a
    candidate, and no candidate stores more bytes than the inputs in fp16: so no budget gives a
    bank larger than the adapters themselves, and mixed ranks are never padded to the largest.
    """

    def __init__(self, factors: list[LoraFactors], weights: torch.Tensor, cfg: HydraOptConfig, module_index: int = 0, moments: ModuleMoments | None = None):
        self.factors = factors
        self.fm, self.w, self.cfg, self.index = factor_space(factors, moments), weights, cfg, module_index
        # what candidates are estimated on: the data-free problem, or with calibration that problem
        # whitened by the mean moment (exact when all tasks' moments agree); measured on self.fm
        self.est = self.fm if moments is None else whitened(self.fm, weights)
        self._space_cache: dict[tuple[int, int], list] = {}
        self._sims: tuple[torch.Tensor, torch.Tensor] | None = None
        self._gb: torch.Tensor | None = None
        self._grouping: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        self._solutions: dict[tuple[int, int, int, bool], LayoutSolution] = {}
        self.stored_a: dict[tuple[int, int, str, int], StoredA] = {}  # closed forms' A's as encoded (_stored), by (k_A, k_B, format, rank)
        r_max, q = max(f.rank for f in factors), self.fm.q
        top = r_max if cfg.per_task else round(cfg.max_rank_multiplier * r_max)
        ranks = [cfg.rank] if cfg.rank else list(range(1, max(1, min(q, top)) + 1))
        self.specs = [(ka, kb, r) for ka, kb in candidate_layouts(self.fm.n_tasks, cfg) for r in ranks]
        self.top_rank = max(ranks)
        self.mixed_ranks = len({f.rank for f in factors}) > 1

    def _groups(self, k_a: int, k_b: int) -> tuple[list[int], list[int]]:
        T = self.fm.n_tasks
        if k_a in (1, T) and k_b in (1, T):  # trivial groupings need no similarity
            return ([0] * T if k_a == 1 else list(range(T))), ([0] * T if k_b == 1 else list(range(T)))
        if (k_a, k_b) not in self._grouping:
            if self._sims is None:
                self._sims = row_space_overlap(self.est), update_cosine(self.est, self._b_gram())
            self._grouping[(k_a, k_b)] = cluster(self._sims[0], k_a), cluster(self._sims[1], k_b)
        return self._grouping[(k_a, k_b)]

    def _solve(self, k_a: int, k_b: int, rank: int, estimate: bool = False) -> LayoutSolution:
        """The float solution of one layout and rank on the measured objective, or (``estimate``)
        on the estimate's; once per module (formats share it)."""
        fm = self.est if estimate else self.fm
        key = (k_a, k_b, rank, fm is self.fm)
        if key not in self._solutions:
            closed = k_a == 1 or k_b == self.fm.n_tasks
            spaces = self._spaces(k_a, k_b) if closed else None
            white = self.est if fm.S is not None else None
            self._solutions[key] = solve_layout(fm, self.w, *self._groups(k_a, k_b), rank, max_iters=self.cfg.max_iters, spaces=spaces, with_B=False, white=white)
        return self._solutions[key]

    def candidates(self) -> list[Candidate]:
        """Every (layout, rank, format) is scored by an estimate (closed-form error from singular
        values plus this module's measured quantisation noise); the ones on the estimate's lower
        convex hull, the only ones the planner can pick, are then measured exactly."""
        fm, w = self.est, self.w
        total = float((w * fm.sq_norms).sum())
        ranks = sorted({r for _, _, r in self.specs})
        float_err: dict[tuple[int, int, int], float] = {}
        for k_a, k_b in dict.fromkeys((ka, kb) for ka, kb, _ in self.specs):
            if k_a == 1 or k_b == fm.n_tasks:
                for r, e in closed_form_errors(fm, w, self._spaces(k_a, k_b), ranks).items():
                    float_err[(k_a, k_b, r)] = e
            else:
                for r in ranks:
                    float_err[(k_a, k_b, r)] = self._solve(k_a, k_b, r, estimate=True).history[-1]
        probe = next(iter(dict.fromkeys((ka, kb, r) for ka, kb, r in self.specs if r == ranks[len(ranks) // 2])))
        probe_sol = self._solve(*probe, estimate=True)
        noise = {fmt.label(): quantisation_noise(fm, w, fmt, probe_sol) for fmt in self.cfg.formats}
        ceiling = self._as_is_nbytes(NumberFormat("fp16"))
        estimates = []
        for (k_a, k_b, r), e in float_err.items():
            for fmt in self.cfg.formats:
                nbytes = self._nbytes(k_a, k_b, r, fmt)
                if nbytes <= ceiling:
                    estimates.append(Candidate(k_a, k_b, r, fmt.label(), nbytes, e + noise[fmt.label()] * (total - e)))
        measured = []
        hull = lower_hull(estimates)
        a_rows: dict[tuple[int, int, str], int] = {}
        for c in hull:
            a_rows[(c.k_a, c.k_b, c.fmt)] = max(c.rank, a_rows.get((c.k_a, c.k_b, c.fmt), 0))
        for c in hull:
            c = replace(c, a_rows=a_rows[(c.k_a, c.k_b, c.fmt)])
            err = self._errors(c)
            a_index, b_index = self._groups(c.k_a, c.k_b)
            measured.append(replace(c, error=float(err.sum()), groups=(tuple(a_index), tuple(b_index))))
        if self.mixed_ranks:  # with equal ranks, (T, T, r) already is the inputs as they are
            measured += [self._as_is(fmt) for fmt in self.cfg.formats]
        return measured

    def _as_is_nbytes(self, fmt: NumberFormat) -> int:
        d_out, d_in = self.fm.shape
        return sum(fmt.nbytes(f.rank, n) for f in self.factors for n in (d_in, d_out))

    def _as_is(self, fmt: NumberFormat) -> Candidate:
        """The inputs as they are in ``fmt``, with the exact error of storing them in it."""
        module = as_is(self.factors, fmt)
        if self.fm.S is not None:
            error = float(stored_error(self.fm, self.w, module).sum())
        else:
            error = sum(float(self.w[t]) * factored_sq_error(f, module.task_factors(t)) for t, f in enumerate(self.factors))
        return Candidate(self.fm.n_tasks, self.fm.n_tasks, AS_IS, fmt.label(), self._as_is_nbytes(fmt), error)

    def _spaces(self, k_a: int, k_b: int) -> list:
        if (k_a, k_b) not in self._space_cache:
            a_idx, b_idx = self._groups(k_a, k_b)
            shared = k_a == 1 and k_b < self.fm.n_tasks
            self._space_cache[(k_a, k_b)] = row_spaces(self.est, self.w, a_idx, b_idx, self.top_rank, self._b_gram() if shared else None)
        return self._space_cache[(k_a, k_b)]

    def _b_gram(self) -> torch.Tensor:
        """factored.b_gram of the tasks' B's, once per module: the B-grouping's similarity and the
        shared-A row spaces both need it."""
        if self._gb is None:
            self._gb = b_gram(self.est.B)
        return self._gb

    def _nbytes(self, k_a: int, k_b: int, rank: int, fmt: NumberFormat) -> int:
        """Payload bytes of this layout's factors (k_A A's and k_B B's of ``rank`` vectors)."""
        d_out, d_in = self.fm.shape
        return k_a * fmt.nbytes(rank, d_in) + k_b * fmt.nbytes(rank, d_out)

    def build(self, c: Candidate) -> MergedModule:
        """The module ``c`` (a solved layout, not the inputs as they are: :func:`build_modules`
        builds those itself) stands for, solved with the groups it was measured with (no
        similarity is recomputed)."""
        if c.groups is not None:
            self._grouping[(c.k_a, c.k_b)] = (list(c.groups[0]), list(c.groups[1]))
        fmt, sol = NumberFormat.parse(c.fmt), self._solve(c.k_a, c.k_b, c.rank)
        return fit_stored(self.fm, self.w, sol, fmt, self._stored(c, sol, fmt, factors=True))[0]

    def _errors(self, c: Candidate) -> torch.Tensor:
        """The exact errors of what :meth:`build` would store for ``c`` (:func:`stored_errors`)."""
        fmt, sol = NumberFormat.parse(c.fmt), self._solve(c.k_a, c.k_b, c.rank)
        return stored_errors(self.fm, self.w, sol, fmt, self._stored(c, sol, fmt, factors=False))

    def _stored(self, c: Candidate, sol: LayoutSolution, fmt: NumberFormat, factors: bool) -> StoredA:
        """``c``'s stored A's. A closed form's A's at rank r are the leading rows of its A's at any
        larger rank, so the A's of a layout and format are encoded once, at the largest rank the
        hull holds of it (``c.a_rows``), and every rank of it (the planner measures many) takes
        their leading rows (:meth:`StoredA.leading`); measuring and building go the same way, so
        the module built is the one measured, bit for bit."""
        if self.fm.S is not None or not (c.k_a == 1 or c.k_b == self.fm.n_tasks) or c.a_rows < c.rank:
            return stored_A(self.fm, sol, fmt)
        key = (c.k_a, c.k_b, c.fmt, c.a_rows)
        if key not in self.stored_a:
            self.stored_a[key] = stored_A(self.fm, self._solve(c.k_a, c.k_b, c.a_rows), fmt)
        return self.stored_a[key].leading(c.rank, factors)


def plan_candidates(adapters: AdapterSet, cfg: HydraOptConfig, on_step: OnStep | None = None, spill: StoredASpill | None = None, weights: torch.Tensor | None = None) -> dict[str, list[Candidate]]:
    """Every module's candidates (reusable across budgets); the first of two passes over the modules
    for ``on_step``. Module state is dropped after each module, so memory stays at one module's
    factored space; the encoded A's :func:`build_modules` may need go to ``spill`` (spill.py).
    ``weights``: :func:`task_weights` when the caller has them (a pass over every module's factors)."""
    w = task_weights(adapters, cfg.calibration) if weights is None else weights

    def plan(m: int, name: str, factors: list[LoraFactors]) -> list[Candidate]:
        module = ModuleCandidates(factors, w, cfg, m, cfg.moments(name))
        out = module.candidates()
        if spill is not None and module.stored_a:
            spill.put(m, module.fm.sq_norms, module.fm.b_grams, module.stored_a)
        return out

    return each_module(adapters, plan, on_step, passes=2)


def build_modules(adapters: AdapterSet, cfg: HydraOptConfig, plans: list[dict[str, Candidate]], on_step: OnStep | None = None, keep: ModuleSink | None = None, spill: StoredASpill | None = None, weights: torch.Tensor | None = None) -> list[dict[str, MergedModule]]:
    """For each plan, the modules it chose; the second of two passes over the modules for
    ``on_step``. A chosen candidate whose A's the first pass left in ``spill`` is built from them
    (B's fitted to them, :func:`fit_to_stored`: the module :meth:`ModuleCandidates.build` gives,
    without the factored space); the inputs as they are need no factored space either; otherwise
    the module's factored space is rebuilt once (cheaper than keeping every module's in memory)
    and serves all plans. ``keep(plan index, name, factors, module)``: each built module is handed
    over at once (in the calling thread, in module order), and what it returns is kept. ``weights``:
    as for :func:`plan_candidates` (the same ones)."""
    w = task_weights(adapters, cfg.calibration) if weights is None else weights

    def build(m: int, name: str, factors: list[LoraFactors]) -> list[MergedModule]:
        spilled = spill.get(m, {(chosen[name].k_a, chosen[name].k_b, chosen[name].fmt, chosen[name].a_rows) for chosen in plans}) if spill is not None else None
        module: ModuleCandidates | None = None
        B: torch.Tensor | None = None
        built: dict[tuple, MergedModule] = {}
        for chosen in plans:
            c = chosen[name]
            if c.spec in built:
                continue
            key = (c.k_a, c.k_b, c.fmt, c.a_rows)
            if c.rank != AS_IS and spilled is not None and key in spilled[2] and c.groups is not None:
                B = stacked_B(factors) if B is None else B
                sq_norms = spilled[0]
                out, err = fit_to_stored(B, sq_norms, spilled[1], w, list(c.groups[0]), list(c.groups[1]), NumberFormat.parse(c.fmt), spilled[2][key].leading(c.rank))
                out.sq_errors = (err.double() / w, sq_norms.double())  # data-free: w_t ||dW_t - dW^_t||^2, the errors module_sq_errors recomputes
            elif c.rank == AS_IS:
                out = with_sq_errors(factors, as_is(factors, NumberFormat.parse(c.fmt)))
            else:
                module = ModuleCandidates(factors, w, cfg, m, cfg.moments(name)) if module is None else module
                out = with_sq_errors(factors, module.build(c))
            built[c.spec] = out
        return [built[chosen[name].spec] for chosen in plans]

    def kept(m: int, name: str, factors: list[LoraFactors], out: list[MergedModule]) -> list[MergedModule]:
        return out if keep is None else [keep(j, name, factors, mod) for j, mod in enumerate(out)]

    per_module = each_module(adapters, build, on_step, passes=2, done=len(adapters.module_names), then=kept)
    return [{name: chosen[i] for name, chosen in per_module.items()} for i in range(len(plans))]
