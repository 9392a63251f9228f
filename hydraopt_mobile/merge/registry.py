"""The merge-method registry: each method is data (name, summary, reference, parameter dataclass)
carrying its build function; :func:`merge` and :func:`merge_budgets` run any of them the same way.

Adding a method is one entry in :data:`METHODS` (its build and parameters live beside the rule).
The CLI lists what this registry holds (``hydraopt methods``) and merges by name.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from hydraopt_mobile.adapters import AdapterSet, LoraFactors
from hydraopt_mobile.atomic import atomic_dir
from hydraopt_mobile.bank import MergedBank, MergedModule, module_sq_errors, relative_from_sums
from hydraopt_mobile.bundle import BUNDLE, BundleWriter, write_bundle
from hydraopt_mobile.calibration import Calibration
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.formats import FORMAT_NAMES, NumberFormat
from hydraopt_mobile.merge import baselines
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.budgeted import HydraOptParams, build_hydraopt, build_per_task
from hydraopt_mobile.merge.compeft import ComPeftParams, build_compeft
from hydraopt_mobile.merge.method import Build, MethodParams, ModuleSink, NoParams, OnStep, Storage
from hydraopt_mobile.parallel import one_thread_per_op


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    reference: str
    build: Build
    params: type[MethodParams] = NoParams
    budgeted: bool = False  # True: storage follows --budget; False: fixed storage (one adapter, or all)
    data_aware: bool = False  # True: takes --calibration (its build accepts ``calibration=``)

    def parameters(self) -> tuple[dataclasses.Field, ...]:
        """The parameter fields (name, default, ``metadata["help"]``), in order."""
        return dataclasses.fields(self.params)


@dataclass(frozen=True)
class MergeConfig:
    """What to merge and how: a method name, its parameters, the number format and the budget.

    ``params``: the method's parameter dataclass, or ``--param`` strings by name (converted by the
    dataclass's field types)."""

    method: str
    fmt: NumberFormat | None = None  # None: hydraopt chooses per module; baselines use fp16
    budget: Budget | None = None
    group_size: int = 32  # int4 group size when hydraopt chooses formats itself
    params: Mapping[str, object] | MethodParams = field(default_factory=dict)
    calibration: Calibration | None = None  # the data-aware objective (calibration.py); None: data-free


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod(
            "hydraopt",
            "shared factors + per-task tensors, layout/rank/format per module under a storage budget",
            "Ceritli et al., HydraOpt, EMNLP 2025 (arXiv 2507.17706)",
            build_hydraopt,
            HydraOptParams,
            budgeted=True,
            data_aware=True,
        ),
        MergeMethod(
            "per-task",
            "each adapter compressed on its own (rank 1..r, fp16/int8/int4 per module) under a storage budget; nothing shared",
            "the alternative every user has; the same planner as hydraopt restricted to k_A = k_B = T",
            build_per_task,
            budgeted=True,
            data_aware=True,
        ),
        MergeMethod(
            "compeft",
            "each adapter's factors sparsified to their largest values, stored as signs + one scale (density from --budget); nothing shared",
            "Yadav et al., ComPEFT (arXiv 2311.13171); applied to the LoRA factors, least-squares scale",
            build_compeft,
            ComPeftParams,
            budgeted=True,
        ),
        MergeMethod("task-arithmetic", "lambda * sum of task updates, re-factorised to rank r", "Ilharco et al., ICLR 2023 (arXiv 2212.04089)", baselines.dense_rule(baselines.task_arithmetic), baselines.TaskArithmeticParams),
        MergeMethod("ties", "trim, elect sign, disjoint mean; re-factorised to rank r", "Yadav et al., NeurIPS 2023 (arXiv 2306.01708)", baselines.dense_rule(baselines.ties), baselines.TiesParams),
        MergeMethod("dare-linear", "random drop + rescale, then weighted sum; re-factorised", "Yu et al., ICML 2024 (arXiv 2311.03099)", baselines.dense_rule(baselines.dare_linear), baselines.DareLinearParams),
        MergeMethod("dare-ties", "random drop + rescale, then TIES sign election; re-factorised", "Yu et al., ICML 2024 (arXiv 2311.03099)", baselines.dense_rule(baselines.dare_ties), baselines.DareTiesParams),
        MergeMethod("svd", "PEFT add_weighted_adapter(combination_type='svd'): weighted sum, truncated SVD", "PEFT, LoraModel.add_weighted_adapter", baselines.dense_rule(baselines.task_arithmetic), baselines.SvdParams),
        MergeMethod("knots", "SVD of side-by-side updates aligns tasks; TIES on the per-task V; rank r", "Stoica et al., ICLR 2025 (arXiv 2410.19735)", baselines.dense_rule(baselines.knots), baselines.KnotsParams),
        MergeMethod("cat", "concatenate factors (exact weighted sum, rank sum r_t)", "PEFT, add_weighted_adapter(combination_type='cat')", baselines.per_module(baselines.concatenate), baselines.CatParams),
        MergeMethod("none", "one adapter per task: the reference", "-", baselines.per_module(baselines.one_per_task)),
    ]
}

DEFAULT_BUDGET = Budget(fraction=0.5)
_BUDGETED = tuple(m.name for m in METHODS.values() if m.budgeted)


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise UserError(f"--method {name!r}: unknown; available: {', '.join(METHODS)}")
    return METHODS[name]


def merge(adapters: AdapterSet, config: MergeConfig, on_step: OnStep | None = None) -> MergedBank:
    """Merge ``adapters`` as ``config`` says and return the bank (not yet written to disk).
    A budgeted method without a budget gets :data:`DEFAULT_BUDGET`; ``on_step(done, total)``
    reports progress."""
    method = get_method(config.method)
    budgets = [config.budget or DEFAULT_BUDGET] if method.budgeted else []
    bank = _merge(adapters, method, config, budgets, on_step, strict=True)[0]
    assert isinstance(bank, MergedBank)
    return bank


def merge_to_bundle(adapters: AdapterSet, config: MergeConfig, out: Path, on_step: OnStep | None = None, overwrite: bool = False, inputs: Iterable[Path] = ()) -> Path:
    """:func:`merge` written to the bundle ``out``: a budgeted method's modules as they are built
    (:func:`merge_to_bundles`, so with a lazily read adapter set memory holds one module, not a
    bank), another method's small bank once merged. The bundle is the one
    ``write_bundle(merge(...))`` writes; an infeasible budget raises and writes nothing."""
    method = get_method(config.method)
    if not method.budgeted:
        return write_bundle(merge(adapters, config, on_step), out, overwrite, inputs)
    [written] = merge_to_bundles(adapters, config, [config.budget or DEFAULT_BUDGET], [out], on_step, overwrite, inputs)
    if isinstance(written, InfeasibleBudget):
        raise written
    return written


def merge_budgets(adapters: AdapterSet, config: MergeConfig, budgets: list[Budget], on_step: OnStep | None = None, strict: bool = True) -> list[MergedBank | InfeasibleBudget]:
    """A budgeted method at several budgets from one pass over the candidates (they do not depend on
    the budget). Budgets are file bytes (storage.py); every bank's files fit its budget. An
    infeasible budget raises, or with ``strict=False`` takes the InfeasibleBudget's place in the list."""
    method = get_method(config.method)
    if not method.budgeted:
        raise _fixed_storage(method)
    return _merge(adapters, method, config, budgets, on_step, strict)


def merge_to_bundles(adapters: AdapterSet, config: MergeConfig, budgets: list[Budget], outs: list[Path], on_step: OnStep | None = None, overwrite: bool = False, inputs: Iterable[Path] = ()) -> list[Path | InfeasibleBudget]:
    """:func:`merge_budgets` (``strict=False``) with each bank written to its bundle in ``outs``
    module by module as it is built (:class:`BundleWriter`): with a lazily read adapter set
    (``load_adapter(..., lazy=True)``) memory holds one module's inputs and outputs, not a bank.
    The bundles are byte for byte those :func:`write_bundle` writes for the banks of :func:`merge_budgets`."""
    method = get_method(config.method)
    if not method.budgeted:
        raise _fixed_storage(method)
    if len(outs) != len(budgets):
        raise UserError(f"{len(budgets)} budgets but {len(outs)} output folders")
    with ExitStack() as stack:
        writers: dict[int, BundleWriter] = {}
        sq = {i: [torch.zeros(len(adapters.tasks), dtype=torch.float64) for _ in range(2)] for i in range(len(budgets))}

        def sink(i: int, name: str, factors: list[LoraFactors], module: MergedModule) -> MergedModule:
            if i not in writers:
                writers[i] = BundleWriter(stack.enter_context(atomic_dir(Path(outs[i]), overwrite, kind=BUNDLE, inputs=inputs)), adapters.task_names)
            err, norms = module.sq_errors if module.sq_errors is not None else module_sq_errors(factors, module)
            sq[i] = [sq[i][0] + err, sq[i][1] + norms]
            return writers[i].add(module)

        banks = _merge(adapters, method, config, budgets, on_step, strict=False, sink=sink, rel_errors=lambda i: relative_from_sums(adapters.task_names, *sq[i]))
        out: list[Path | InfeasibleBudget] = []
        for i, bank in enumerate(banks):
            if isinstance(bank, InfeasibleBudget):
                out.append(bank)
                continue
            writers[i].finish(bank)
            out.append(Path(outs[i]))
    return out


def _merge(adapters: AdapterSet, method: MergeMethod, config: MergeConfig, budgets: list[Budget], on_step: OnStep | None, strict: bool, sink: ModuleSink | None = None, rel_errors: Callable[[int], dict[str, float]] | None = None) -> list[MergedBank | InfeasibleBudget]:
    """Every op on one thread, modules on the caller's threads (parallel.py): the banks' bytes do
    not depend on the thread count."""
    with one_thread_per_op():
        return _merge_banks(adapters, method, config, budgets, on_step, strict, sink, rel_errors)


def _merge_banks(adapters: AdapterSet, method: MergeMethod, config: MergeConfig, budgets: list[Budget], on_step: OnStep | None, strict: bool, sink: ModuleSink | None, rel_errors: Callable[[int], dict[str, float]] | None) -> list[MergedBank | InfeasibleBudget]:
    params = _params(method, config.params)
    storage = dataclasses.replace(_storage(method, config, budgets), sink=sink)
    given = {k: v for k, v in dataclasses.asdict(params).items() if v is not None}
    if config.calibration is None:
        built = method.build(adapters, params, storage, on_step)
    elif not method.data_aware:
        raise UserError(f"--calibration applies to {', '.join(m.name for m in METHODS.values() if m.data_aware)}; {method.name!r} does not use data")
    elif config.calibration.tasks != adapters.task_names:
        raise UserError(f"--calibration: collected for tasks {config.calibration.tasks}, merging {adapters.task_names}")
    else:
        built = method.build(adapters, params, storage, on_step, calibration=config.calibration)
        given["calibration_tokens"] = config.calibration.tokens
    if not method.budgeted:
        return [_bank(adapters, method, given | {"format": storage.formats[0].label()}, built[0])]
    recorded = given | {"formats": [f.label() for f in storage.formats]}
    out: list[MergedBank | InfeasibleBudget] = []
    for i, (budget, modules) in enumerate(zip(budgets, built, strict=True)):
        if isinstance(modules, InfeasibleBudget):
            if strict:
                raise modules
            out.append(modules)
            continue
        bank = _bank(adapters, method, recorded | {"budget": budget.label()}, modules, None if rel_errors is None else rel_errors(i))
        if bank.total_file_bytes() > budget.resolve(adapters.reference_file_bytes()):  # the allocator's bound guarantees this; a bug otherwise
            raise AssertionError(f"{method.name} at {budget.label()}: {bank.total_file_bytes():,} file bytes exceed the budget")
        out.append(bank)
    return out


def _fixed_storage(method: MergeMethod) -> UserError:
    return UserError(f"--budget applies to budgeted methods ({', '.join(_BUDGETED)}); {method.name!r} has fixed storage")


def _params(method: MergeMethod, given: Mapping[str, object] | MethodParams) -> MethodParams:
    if isinstance(given, MethodParams):
        if not isinstance(given, method.params):
            raise UserError(f"--method {method.name}: takes {method.params.__name__}, not {type(given).__name__}")
        return given
    return method.params.parse(given)


def _storage(method: MergeMethod, config: MergeConfig, budgets: list[Budget]) -> Storage:
    if not method.budgeted:
        if config.budget is not None:
            raise _fixed_storage(method)
        return Storage(formats=(config.fmt or NumberFormat("fp16"),))
    if config.fmt is not None:
        return Storage(formats=(config.fmt,), budgets=tuple(budgets))
    return Storage(formats=tuple(NumberFormat(name, config.group_size) for name in FORMAT_NAMES), budgets=tuple(budgets))  # type: ignore[arg-type]


def _bank(adapters: AdapterSet, method: MergeMethod, params: dict, modules: dict[str, MergedModule], rel_errors: dict[str, float] | None = None) -> MergedBank:
    bank = MergedBank(
        tasks=adapters.task_names,
        modules=modules,
        method=method.name,
        params=params,
        fingerprint=adapters.fingerprint(),
        reference_file_bytes=adapters.reference_file_bytes(),
        reference_payload_bytes=adapters.fp16_bytes(),
    )
    bank.rel_errors = rel_errors if rel_errors is not None else bank.measured_relative_errors() or bank.relative_errors(adapters)
    return bank
