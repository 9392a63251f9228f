"""Adding tasks to a merged bank without changing anything it already stores.

A deployed bank's files are on phones; a new task must ship as its own file only. So a new task
``t`` may use the bank's *resident* factors (those in the shared file: every factor that serves two
or more tasks) and factors of its own, which go into its own task file; it never uses a factor
that lives in another task's file (a device would have to load that task too). Because a resident
factor only gains users and every new factor has exactly one user, the rule that places factors
(``bank.factor_file``: one user -> that task's file, more -> the shared file) puts every existing
factor where it was: the shared file and every existing task file keep their bytes, whatever the
new tasks' names (task order changes the manifest only; keys in the files hold factor indices,
which only grow at the end, never task indices). A factor shared by several *new* tasks would be a
new resident factor, i.e. a change of the shared file, so each new task gets its own.

Per module (shape d_out x d_in, bank rank r'), with ``dW_t = B_t A_t`` (r_t components) and the
fixed stored factors ``A_s`` (r' x d_in), ``B_s`` (d_out x r'), the options are, cheapest first:

- *resident pair* ``(B_s, A_s)``: no bytes; error ``||dW_t - B_s A_s||_F^2`` from factors only
  (factored.py: ``||BA||^2 = tr((B^T B)(A A^T))``, ``<B1 A1, B2 A2> = tr((B1^T B2)(A2 A1^T))``).
- *resident A, own B*: ``min_X ||dW_t - X A_s||_F``. Setting the gradient to zero,
  ``X (A_s A_s^T) = dW_t A_s^T = B_t (A_t A_s^T)``, so ``X = B_t (A_t A_s^T)(A_s A_s^T)^+ = dW_t A_s^+``
  without forming ``dW_t``: an (r_t x r') and an (r' x r') product. The solver's B-step
  (``solve_B``, from ``A_t A^T`` and ``A A^T`` in d_in coordinates) computes exactly this.
- *resident B, own A*: ``min_Y ||dW_t - B_s Y||_F`` gives ``(B_s^T B_s) Y = B_s^T dW_t``, so
  ``Y = (B_s^T B_s)^+ (B_s^T B_t) A_t = B_s^+ dW_t``, whose rows lie in the row space of ``A_t``
  (the solver's A-step, in the task's own row basis ``Q``).
- *own pair* of rank ``rho <= r'``: the best rank-``rho`` approximation of ``dW_t`` (the solver's
  closed form with one task), stored by ``fit_stored`` (quantise A, re-fit B to it, quantise B).
- *nothing* (rank-0 own factors): no bytes, error ``||dW_t||^2``.

Own factors are encoded in the module's number format, at ranks up to the module's largest rank
(so a program built for the bank's slot ranks still fits), or up to the deployed program's slot rank
where the caller gives its signature (``max_ranks``: a program exported with ``--slots`` has room
for more). What those slot ranks cost is reported: the same allocation with own pairs up to each
new adapter's own rank (``AddedTask.rel_error_with_room``), so a user can see whether a program
with wider slots is worth exporting before the next update. Errors are weighted like the merge
(``w_t = 1 / sum_modules ||dW_t||^2``, squared relative errors), and the same allocator as the
merge (allocator.py) picks, over all new tasks and modules, the options with the best error drop
per byte until the byte allowance for the new task files is spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from hydraopt_mobile.adapters import AdapterError, AdapterSet, LoraFactors, base_model_name
from hydraopt_mobile.bank import SHARED, MergedBank, MergedModule, factor_file, task_file
from hydraopt_mobile.bundle import open_bundle, write_bundle
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.factored import DTYPE, factor_space, factored_sq_error, sq_norm
from hydraopt_mobile.formats import NumberFormat, StoredFactor
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.solver import fit_stored, row_spaces, solve_a, solve_B, solve_layout
from hydraopt_mobile.merge.allocator import Candidate, allocate
from hydraopt_mobile.paths import duplicate_ignoring_case
from hydraopt_mobile.storage import TensorSpec, factor_specs, file_overhead_bound

RESIDENT, OWN_B, OWN_A, OWN_PAIR, NOTHING = "resident", "own B", "own A", "own A+B", "nothing"


class AddError(UserError):
    """New tasks that do not fit the bank; the message names the task, module or option."""


@dataclass(frozen=True)
class Option:
    """One way to serve a new task in one module: an existing resident factor (an index) or a new
    stored factor of its own, for A and for B."""

    kind: str
    A: int | StoredFactor
    B: int | StoredFactor
    error: float  # weighted squared error of exactly what is stored
    specs: tuple[TensorSpec, ...] = ()  # the tensors it adds to the task's own file
    rank: int = 0  # an own pair's rank (the slot rank a program needs for it)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


@dataclass
class AddedTask:
    """What ``add`` did for one new task."""

    task: str
    rel_error: float  # ||dW - dW^||_F / ||dW||_F over all modules
    file_bytes: int  # its task file (0: it uses resident factors only)
    choices: dict[str, int] = field(default_factory=dict)  # option kind -> number of modules
    # How well the bundle's resident factors could serve it, whatever was chosen: over the modules
    # with a resident factor, the relative error of the best option using one (with an own
    # complementary factor where that option has one), and of the best own factors (or nothing)
    # within the same bytes per module. None where no module has a resident factor.
    resident_modules: int = 0
    resident_rel_error: float | None = None
    own_rel_error_same_bytes: float | None = None
    # What the program's slot ranks cost it: its relative error had the slots room for own pairs up
    # to the new adapter's rank in every module (same allowance, all new tasks allocated together),
    # and the slot rank a program needs for that (the largest own rank it uses, or the bank's largest
    # rank or the given signature's, if higher). None where the slots already have that room.
    rel_error_with_room: float | None = None
    rank_with_room: int | None = None


def resident(index: list[int], tasks: list[str]) -> list[int]:
    """Factors that live in the shared file (used by two or more tasks): the ones a new task may use."""
    return [i for i in sorted(set(index)) if factor_file(tasks, index, i)[0] == SHARED]


def least_squares_B(target: LoraFactors, A: torch.Tensor) -> torch.Tensor:
    """``argmin_X ||B_t A_t - X A||_F`` = ``B_t (A_t A^T)(A A^T)^+`` (module docstring)."""
    return solve_B(factor_space([target]), torch.ones(1), A[None], [0], [0], 1)[0]


def least_squares_A(target: LoraFactors, B: torch.Tensor) -> torch.Tensor:
    """``argmin_Y ||B_t A_t - B Y||_F`` = ``(B^T B)^+ (B^T B_t) A_t`` (module docstring)."""
    fm = factor_space([target])
    return fm.to_input_space(solve_a(fm, torch.ones(1), B.to(DTYPE)[None], [0], [0], 1)[0])


def module_options(module: MergedModule, tasks: list[str], target: LoraFactors, weight: float, module_index: int, max_rank: int | None = None) -> list[Option]:
    """Every option (module docstring) for one new task in one module, with its exact stored error;
    own pairs up to ``max_rank`` (default: the module's largest rank) and, beyond it, up to the
    task's own rank (what :func:`within_slots` leaves out: for :attr:`AddedTask.rel_error_with_room`)."""
    d_out, d_in = module.shape
    fmt = module.fmt
    total = weight * sq_norm(target)

    def err(A: torch.Tensor, B: torch.Tensor) -> float:
        return weight * factored_sq_error(target, LoraFactors(A, B))

    def own(matrix: torch.Tensor, kind: str) -> tuple[StoredFactor, tuple[TensorSpec, ...]]:
        stored = StoredFactor.encode(matrix.float(), fmt, transposed=kind == "B")
        return stored, tuple(factor_specs(module_index, kind, None, fmt, *stored.vectors_shape))

    options = [Option(NOTHING, _empty(fmt, (0, d_in), False), _empty(fmt, (d_out, 0), True), total)]
    if not target.rank:  # a module the new task lacks (--allow-missing): nothing is exact
        return options
    res_A, res_B = resident(module.a_index, tasks), resident(module.b_index, tasks)
    for a in res_A:
        A = module.A[a].values()
        for b in res_B:
            if module.B[b].shape[1] == A.shape[0]:
                options.append(Option(RESIDENT, a, b, err(A, module.B[b].values())))
        if A.shape[0]:
            B, specs = own(least_squares_B(target, A), "B")
            options.append(Option(OWN_B, a, B, err(A, B.values()), specs))
    for b in res_B:
        B = module.B[b].values()
        if B.shape[1]:
            A, specs = own(least_squares_A(target, B), "A")
            options.append(Option(OWN_A, A, b, err(A.values(), B), specs))
    fm = factor_space([target])
    w = torch.tensor([weight], dtype=torch.float64)
    top = min(max(module.largest_rank if max_rank is None else max_rank, target.rank), fm.q)
    spaces = row_spaces(fm, w, [0], [0], max(top, 1))
    for rho in range(1, top + 1):
        built, e = fit_stored(fm, w, solve_layout(fm, w, [0], [0], rho, spaces=spaces), fmt)
        A, B = built.A[0], built.B[0]
        specs = tuple(factor_specs(module_index, "A", None, fmt, *A.vectors_shape) + factor_specs(module_index, "B", None, fmt, *B.vectors_shape))
        options.append(Option(OWN_PAIR, A, B, float(e.sum()), specs, rho))
    return options


def within_slots(options: list[Option], cap: int) -> list[Option]:
    """The options a program whose slot in the module has rank ``cap`` can run."""
    return [o for o in options if o.kind != OWN_PAIR or o.rank <= cap]


def resident_fit(per_module: list[list[Option]]) -> tuple[int, float | None, float | None]:
    """``(modules, resident_rel_error, own_rel_error_same_bytes)`` of :class:`AddedTask` from one
    task's option lists (each starts with NOTHING, whose error is the module's weighted ``||dW||^2``)."""
    resident_err = own_err = total = 0.0
    modules = 0
    for opts in per_module:
        using = [o for o in opts if o.kind in (RESIDENT, OWN_A, OWN_B)]
        if not using:
            continue
        best = min(using, key=lambda o: o.error)
        own = min((o for o in opts if o.kind in (NOTHING, OWN_PAIR) and o.nbytes <= best.nbytes), key=lambda o: o.error)
        modules, resident_err, own_err, total = modules + 1, resident_err + best.error, own_err + own.error, total + opts[0].error
    if not modules or total <= 0:
        return modules, None, None
    return modules, (resident_err / total) ** 0.5, (own_err / total) ** 0.5


def _empty(fmt: NumberFormat, shape: tuple[int, int], transposed: bool) -> StoredFactor:
    """A rank-0 factor: stores nothing (as a bundle reads one back)."""
    parts = fmt.encoded_shapes(0, shape[0] if transposed else shape[1])
    return StoredFactor(fmt, {part: torch.zeros(s, dtype=dtype) for part, (dtype, s) in parts.items()}, shape, transposed)


def check_fit(bank: MergedBank, adapters: AdapterSet) -> None:
    """Refuse new tasks the bank cannot take: names it has, another base model, other modules."""
    clash = [t for t in adapters.task_names if t in bank.tasks]
    if clash:
        raise AddError(f"task {clash[0]!r} is already in the bundle; give the new adapter another name with NAME=PATH")
    case = duplicate_ignoring_case(bank.tasks + adapters.task_names)
    if case:
        raise AddError(f"tasks {case[0]!r} and {case[1]!r} differ only in case; they would be the same file on macOS and Windows")
    base = base_model_name(bank.fingerprint.get("base_model"))  # a bundle written before local folders were cut to their names
    if base and adapters.base_model and base != adapters.base_model:
        raise AddError(f"{adapters.tasks[0].path}: made for base model {adapters.base_model!r}, the bundle for {base!r}")
    outside = [m for m in adapters.module_names if m not in bank.modules]
    if outside:
        raise AddError(f"{adapters.tasks[0].path}: module {outside[0]!r} is not in the bundle (it has {len(bank.modules)} modules); a bank cannot take a module it has no factors for")
    for name in adapters.module_names:
        if tuple(adapters.shapes[name]) != tuple(bank.modules[name].shape):
            raise AddError(f"module {name!r}: shape (d_out, d_in)={tuple(adapters.shapes[name])} in the new adapters but {tuple(bank.modules[name].shape)} in the bundle: another base model")


def check_signature(bank: MergedBank, max_ranks: dict[str, int]) -> None:
    """Refuse a signature that does not hold the bank: a module without a slot, or a slot of lower
    rank than the bank's factors (the deployed program could not run the bank itself). A module no
    task uses needs no slot (``export`` leaves it out); new tasks then store nothing there."""
    for name, module in bank.modules.items():
        rank = module.largest_rank
        if name not in max_ranks and rank:
            raise AddError(f"--slots: bundle module {name!r} has no slot in the signature; give the signature the deployed program was exported with")
        if rank > max_ranks.get(name, 0):
            raise AddError(f"--slots: bundle module {name!r} has rank {rank}, above the signature's {max_ranks.get(name, 0)}: the deployed program cannot be this one")


def add_tasks(bank: MergedBank, adapters: AdapterSet, allowance_bytes: int, allow_missing: bool = False, max_ranks: dict[str, int] | None = None) -> tuple[MergedBank, list[AddedTask]]:
    """``bank`` with the tasks of ``adapters`` added, their new files together at most
    ``allowance_bytes`` file bytes, every existing factor unchanged; and a report per new task.
    ``max_ranks``: the deployed program's slot signature (module -> rank), which must hold the bank."""
    check_fit(bank, adapters)
    if max_ranks is not None:
        check_signature(bank, max_ranks)
    missing = [(t.name, m) for t in adapters.tasks for m in bank.modules if m not in t.modules]
    if missing and not allow_missing:
        task, module = missing[0]
        raise AdapterError(f"task {task!r} lacks bundle module {module!r}; pass --allow-missing to treat missing modules as zero updates")
    norms = torch.zeros(len(adapters.tasks), dtype=torch.float64)
    for t, task in enumerate(adapters.tasks):
        norms[t] = sum(sq_norm(f) for f in task.modules.values())
    weights = 1.0 / norms.clamp_min(1e-30)
    everything: dict[tuple[str, str], list[Option]] = {}
    options: dict[tuple[str, str], list[Option]] = {}
    for m, (name, module) in enumerate(bank.modules.items()):
        d_out, d_in = module.shape
        cap = module.largest_rank if max_ranks is None else max_ranks.get(name, 0)
        for t, task in enumerate(adapters.tasks):
            target = task.modules.get(name, LoraFactors(torch.zeros(0, d_in), torch.zeros(d_out, 0)))
            everything[(task.name, name)] = module_options(module, bank.tasks, target, float(weights[t]), m, cap)
            options[(task.name, name)] = within_slots(everything[(task.name, name)], cap)
    chosen = _allocate(options, allowance_bytes, len(adapters.tasks))
    roomy = _allocate(everything, allowance_bytes, len(adapters.tasks)) if any(len(everything[k]) > len(v) for k, v in options.items()) else None
    modules = {}
    for name, module in bank.modules.items():
        A, B = list(module.A), list(module.B)
        a_index, b_index = list(module.a_index), list(module.b_index)
        for task in adapters.task_names:
            opt = chosen[(task, name)]
            for new, factors, index in ((opt.A, A, a_index), (opt.B, B, b_index)):
                if isinstance(new, StoredFactor):
                    factors.append(new)
                    index.append(len(factors) - 1)
                else:
                    index.append(new)
        modules[name] = MergedModule(module.shape, a_index, b_index, A, B)
    tasks = bank.tasks + adapters.task_names
    grown = replace(
        bank,
        tasks=tasks,
        modules=modules,
        reference_file_bytes=bank.reference_file_bytes + adapters.reference_file_bytes(),
        reference_payload_bytes=bank.reference_payload_bytes + adapters.fp16_bytes(),
    )
    files = grown.file_bytes()
    report = []
    floor = max([m.largest_rank for m in bank.modules.values()] + list((max_ranks or {}).values()))  # what the program already has

    def rel_error(picks: list[Option], t: int) -> float:
        return (sum(p.error for p in picks) / float(weights[t]) / max(float(norms[t]), 1e-30)) ** 0.5

    for t, task in enumerate(adapters.task_names):
        picks = [chosen[(task, name)] for name in bank.modules]
        kinds = [p.kind for p in picks]
        fit = resident_fit([options[(task, name)] for name in bank.modules])
        row = AddedTask(task, rel_error(picks, t), files.get(task_file(task), 0), {k: kinds.count(k) for k in dict.fromkeys(kinds)}, *fit)
        if roomy is not None:
            room = [roomy[(task, name)] for name in bank.modules]
            row.rel_error_with_room, row.rank_with_room = rel_error(room, t), max(floor, *(p.rank for p in room))
        report.append(row)
    grown.rel_errors = dict(bank.rel_errors) | {r.task: r.rel_error for r in report}
    new_bytes = sum(r.file_bytes for r in report)
    if new_bytes > allowance_bytes:  # the allocator's bound guarantees this; a bug otherwise
        raise AssertionError(f"new task files take {new_bytes:,} bytes, over the allowance of {allowance_bytes:,}")
    return grown, report


def _allocate(options: dict[tuple[str, str], list[Option]], allowance: int, n_tasks: int) -> dict[tuple[str, str], Option]:
    """The merge's allocator over (task, module) option lists. Each option becomes a
    :class:`Candidate` whose ``k_a`` is its position in its list; bytes are its payload, and each new
    task file's fixed overhead (its header priced at the allowance's digits) is set aside first."""
    cands = {}
    for key, opts in options.items():
        cands[key] = [
            Candidate(i, 0, 0, "", o.nbytes, o.error)
            for i, o in enumerate(opts)
        ]
    budget = allowance - n_tasks * file_overhead_bound(len(str(max(allowance, 1))))
    try:
        picks = allocate(cands, budget)  # type: ignore[arg-type]
    except InfeasibleBudget:
        picks = {}
    if not picks:  # every key has a zero-byte option, so this only happens when the overhead itself does not fit
        picks = {key: min((c for c in cs if c.nbytes == 0), key=lambda c: c.error) for key, cs in cands.items()}
    return {key: options[key][c.k_a] for key, c in picks.items()}


def add_to_bundle(bundle: Path, adapters: AdapterSet, out: Path, allowance: Budget | None = None, overwrite: bool = False, allow_missing: bool = False,
                  max_ranks: dict[str, int] | None = None) -> tuple[int, list[AddedTask]]:
    """Write ``out``: bundle ``bundle`` plus the tasks of ``adapters``, whose new files take at most
    ``allowance`` (a fraction of the new adapters' fp16 file bytes, or bytes; default: the bundle's
    own storage fraction, so the grown bundle keeps it). Every file of ``bundle`` is written again
    byte for byte, which :func:`write_bundle` checks before ``out`` appears. Returns the allowance
    in bytes and the report per new task. ``max_ranks``: as :func:`add_tasks`."""
    manifest, bank = open_bundle(bundle)
    reference = adapters.reference_file_bytes()
    nbytes = allowance.resolve(reference) if allowance is not None else int(bank.storage_fraction() * reference)
    grown, report = add_tasks(bank, adapters, nbytes, allow_missing, max_ranks)
    write_bundle(grown, out, overwrite, inputs=[Path(bundle), *(t.path for t in adapters.tasks)], unchanged=manifest["files"])
    return nbytes, report
