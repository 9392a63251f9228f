"""The merge-method registry: each method is data (name, parameters, reference) plus one function.

The CLI lists what this registry holds (``hydraopt methods``) and merges by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.progress import Progress

from hydraopt_mobile.adapters import AdapterSet
from hydraopt_mobile.bank import MergedBank, MergedModule
from hydraopt_mobile.formats import FORMAT_NAMES, NumberFormat
from hydraopt_mobile.merge import baselines
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.method_hydraopt import HydraOptConfig, build_modules, plan_candidates
from hydraopt_mobile.merge.planner import minimum_bytes, plan
from hydraopt_mobile.storage import file_overhead_bound


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    help: str


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    reference: str
    params: tuple[Param, ...] = ()
    budgeted: bool = False  # True: storage follows --budget; False: fixed storage (one adapter, or all)

    def resolve_params(self, given: dict[str, str]) -> dict[str, Any]:
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"method {self.name!r} has no parameter {unknown[0]!r} (it has: {', '.join(known) or 'none'})")
        out: dict[str, Any] = {}
        for p in self.params:
            raw = given.get(p.name, p.default)
            if raw is None or raw in ("", "none"):
                out[p.name] = None
                continue
            convert = type(p.default) if p.default is not None else _number
            try:
                out[p.name] = convert(raw)
            except ValueError as e:
                raise ValueError(f"--param {p.name}={raw!r}: {e}") from e
        return out


def _number(raw: Any) -> Any:
    s = str(raw)
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


@dataclass(frozen=True)
class MergeConfig:
    """What to merge and how: a method name, its parameters, the number format and the budget."""

    method: str
    fmt: NumberFormat | None = None  # None: hydraopt chooses per module; baselines use fp16
    budget: Budget | None = None
    group_size: int = 32  # int4 group size when hydraopt chooses formats itself
    params: dict[str, str] = field(default_factory=dict)


_W = Param("weight", 1.0, "weight of every task's update")
_DENSITY = Param("density", 0.2, "fraction of values kept per task")
_SIGN = Param("majority_sign", "total", "TIES sign election: total or frequency")
_RANK = Param("rank", None, "rank of the merged adapter (default: largest input rank)")
_SEED = Param("seed", 0, "random seed of DARE's drop mask")

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod(
            "hydraopt",
            "shared factors + per-task tensors, layout/rank/format per module under a storage budget",
            "Ceritli et al., HydraOpt, EMNLP 2025 (arXiv 2507.17706)",
            (
                Param("k_a", None, "fix the number of A-groups"),
                Param("k_b", None, "fix the number of B-groups"),
                Param("rank", None, "fix the shared rank r'"),
            ),
            budgeted=True,
        ),
        MergeMethod(
            "per-task",
            "each adapter compressed on its own (rank 1..r, fp16/int8/int4 per module) under a storage budget; nothing shared",
            "the alternative every user has; the same planner as hydraopt restricted to k_A = k_B = T",
            budgeted=True,
        ),
        MergeMethod("task-arithmetic", "lambda * sum of task updates, re-factorised to rank r", "Ilharco et al., ICLR 2023 (arXiv 2212.04089)", (Param("weight", 0.3, "lambda"), _RANK)),
        MergeMethod("ties", "trim, elect sign, disjoint mean; re-factorised to rank r", "Yadav et al., NeurIPS 2023 (arXiv 2306.01708)", (_W, _DENSITY, _SIGN, _RANK)),
        MergeMethod("dare-linear", "random drop + rescale, then weighted sum; re-factorised", "Yu et al., ICML 2024 (arXiv 2311.03099)", (Param("weight", 0.3, "lambda"), Param("density", 0.5, "keep probability"), _SEED, _RANK)),
        MergeMethod("dare-ties", "random drop + rescale, then TIES sign election; re-factorised", "Yu et al., ICML 2024 (arXiv 2311.03099)", (_W, Param("density", 0.5, "keep probability"), _SIGN, _SEED, _RANK)),
        MergeMethod("svd", "PEFT add_weighted_adapter(combination_type='svd'): weighted sum, truncated SVD", "PEFT, LoraModel.add_weighted_adapter", (Param("weight", None, "weight per task (default 1/T)"), _RANK)),
        MergeMethod("knots", "SVD of side-by-side updates aligns tasks; TIES on the per-task V; rank r", "Stoica et al., ICLR 2025 (arXiv 2410.19735)", (_W, Param("density", 0.5, "TIES density on V"), _SIGN, _RANK)),
        MergeMethod("cat", "concatenate factors (exact weighted sum, rank sum r_t)", "PEFT, add_weighted_adapter(combination_type='cat')", (Param("weight", None, "weight per task (default 1/T)"),)),
        MergeMethod("none", "one adapter per task: the reference", "-", ()),
    ]
}

_DENSE_RULES: dict[str, Callable] = {
    "task-arithmetic": baselines.task_arithmetic,
    "ties": baselines.ties,
    "dare-linear": baselines.dare_linear,
    "dare-ties": baselines.dare_ties,
    "svd": baselines.svd_merge,
    "knots": baselines.knots,
}


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ValueError(f"--method {name!r}: unknown; available: {', '.join(METHODS)}")
    return METHODS[name]


def merge(adapters: AdapterSet, config: MergeConfig, progress: bool = True) -> MergedBank:
    """Merge ``adapters`` as ``config`` says and return the bank (not yet written to disk)."""
    if get_method(config.method).budgeted:
        return merge_budgets(adapters, config, [config.budget or DEFAULT_BUDGET], progress)[0]
    method = get_method(config.method)
    params = method.resolve_params(config.params)
    if config.budget is not None:
        raise ValueError(f"--budget applies to budgeted methods (hydraopt, per-task); {method.name!r} has fixed storage")
    fmt = config.fmt or NumberFormat("fp16")
    with _progress(progress, method.name, len(adapters.module_names)) as tick:
        if method.name == "none":
            modules = baselines.merge_modules(adapters, baselines.one_per_task, params, fmt, tick)
        elif method.name == "cat":
            modules = baselines.merge_modules(adapters, baselines.concatenate, params, fmt, tick)
        else:
            rule = _DENSE_RULES[method.name]
            modules = baselines.merge_modules(adapters, lambda f, p, x: baselines.merged_module(rule, f, p, x), params, fmt, tick)
    recorded = {k: v for k, v in params.items() if v is not None} | {"format": fmt.label()}
    return _bank(adapters, method, recorded, modules)


def merge_budgets(adapters: AdapterSet, config: MergeConfig, budgets: list[Budget], progress: bool = True, strict: bool = True) -> list[MergedBank | InfeasibleBudget]:
    """A budgeted method at several budgets from one pass over the candidates (they do not depend on
    the budget). Budgets are file bytes (storage.py); every bank's files fit its budget. An
    infeasible budget raises, or with ``strict=False`` takes the InfeasibleBudget's place in the list."""
    method = get_method(config.method)
    if not method.budgeted:
        raise ValueError(f"--budget applies to budgeted methods ({', '.join(m.name for m in METHODS.values() if m.budgeted)}); {method.name!r} has fixed storage")
    params = method.resolve_params(config.params)
    cfg = HydraOptConfig(formats=_formats(config), k_a=params.get("k_a"), k_b=params.get("k_b"), rank=params.get("rank"), per_task=method.name == "per-task")
    reference = adapters.reference_file_bytes()
    fixed = (len(adapters.tasks) + 1) * file_overhead_bound()  # the shared file and one per task
    n = len(adapters.module_names)
    with _progress(progress, method.name, 2 * n) as tick:
        cands = plan_candidates(adapters, cfg, tick)
        plans: list[dict | InfeasibleBudget] = []
        for budget in budgets:
            nbytes = budget.resolve(reference)
            try:
                plans.append(plan(cands, nbytes - fixed, offset_digits=len(str(nbytes))))
            except InfeasibleBudget:
                smallest = fixed + minimum_bytes(cands, offset_digits=len(str(fixed + minimum_bytes(cands))))
                error = InfeasibleBudget(
                    f"--budget {budget.label()} ({nbytes:,} bytes) is infeasible: the smallest feasible budget is "
                    f"{smallest:,} bytes ({smallest / reference:.4f} of fp16 one-adapter-per-task, in file bytes)"
                )
                if strict:
                    raise error from None
                plans.append(error)
        feasible = [p for p in plans if not isinstance(p, InfeasibleBudget)]
        built = iter(build_modules(adapters, cfg, feasible, tick))
    recorded = {k: v for k, v in params.items() if v is not None} | {"formats": [f.label() for f in cfg.formats]}
    out: list[MergedBank | InfeasibleBudget] = []
    for budget, p in zip(budgets, plans):
        if isinstance(p, InfeasibleBudget):
            out.append(p)
            continue
        bank = _bank(adapters, method, recorded | {"budget": budget.label()}, next(built))
        if bank.total_file_bytes() > budget.resolve(reference):  # the planner's bound guarantees this; a bug otherwise
            raise AssertionError(f"{method.name} at {budget.label()}: {bank.total_file_bytes():,} file bytes exceed the budget")
        out.append(bank)
    return out


def _bank(adapters: AdapterSet, method: MergeMethod, params: dict, modules: dict[str, MergedModule]) -> MergedBank:
    bank = MergedBank(
        tasks=adapters.task_names,
        modules=modules,
        method=method.name,
        params=params,
        fingerprint=adapters.fingerprint(),
        reference_file_bytes=adapters.reference_file_bytes(),
        reference_payload_bytes=adapters.fp16_bytes(),
    )
    bank.rel_errors = bank.relative_errors(adapters)
    return bank


@contextmanager
def _progress(enabled: bool, label: str, total: int) -> Iterator[Callable[[], None]]:
    with Progress(disable=not enabled, transient=True) as bar:
        task = bar.add_task(f"{label}: modules", total=total)
        yield lambda: bar.advance(task)


DEFAULT_BUDGET = Budget(fraction=0.5)


def _formats(config: MergeConfig) -> tuple[NumberFormat, ...]:
    if config.fmt is not None:
        return (config.fmt,)
    return tuple(NumberFormat(name, config.group_size) for name in FORMAT_NAMES)  # type: ignore[arg-type]
