"""Choosing a budget on your own texts, without labels: budgeted methods' banks at several budgets
(and one merged adapter's, at its own storage, for comparison), their file bytes, and how close
each keeps every task to its own adapter end to end (fidelity.py: the next-token KL and the share
of positions predicting the same token, on the task's texts).

Why not the reconstruction error that ``hydraopt inspect`` shows: it is per module and blind to how
the errors of all modules combine in the model. The KL sees the model's output, and it orders the
suite's banks by their scores better (benchmarks/results/proxy_check.md: Spearman 0.84 over 39
banks of every method, against 0.79 for the data-free error). It is a guide to the budget, not a
score: among the planner's own banks, whose differences are small, it orders them as weakly as the
errors do (0.51).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from hydraopt_mobile.adapter_weights import check_fits
from hydraopt_mobile.adapters import AdapterSet
from hydraopt_mobile.atomic import atomic_dir, json_marker
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.calibration import Calibration, Text
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.fidelity import TaskFidelity, check_texts, fidelity_to_adapters
from hydraopt_mobile.formats import NumberFormat
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.method import OnStep, part_of
from hydraopt_mobile.merge.registry import MergeConfig, get_method, merge, merge_budgets
from hydraopt_mobile.plotting import figure
from hydraopt_mobile.sharing import NO_SHARING, plan_label

FORMAT = "hydraopt-sweep"
SWEEP = json_marker("budget sweep", "sweep.json", "format", FORMAT)
DEFAULT_METHODS = ("hydraopt", "per-task")
FIXED = "fixed"  # the budget of a method whose storage is its own (one merged adapter)
MERGED_ADAPTERS = (0.5, 1, 2, 4)
"""The default budgets in one merged adapter's bytes (1/T of the fp16 adapters' files): from half
of it, where only sharing or very low ranks fit, to four times it."""


def default_budgets(n_tasks: int) -> list[Budget]:
    return [Budget(fraction=round(k / n_tasks, 4)) for k in MERGED_ADAPTERS if k / n_tasks <= 1]


@dataclass(frozen=True)
class SweepPoint:
    """One method at one budget: its bank's bytes and plan, and each task's fidelity (none when the
    budget is infeasible: ``infeasible`` says why)."""

    method: str
    budget: str  # Budget.label(), or FIXED
    file_bytes: int | None
    storage_fraction: float | None
    plan: str | None
    tasks: dict[str, TaskFidelity]
    infeasible: str | None = None

    @property
    def mean_kl(self) -> float | None:
        return statistics.fmean(f.kl for f in self.tasks.values()) if self.tasks else None

    @property
    def mean_agreement(self) -> float | None:
        return statistics.fmean(f.agreement for f in self.tasks.values()) if self.tasks else None

    @property
    def shares_factors(self) -> bool:
        return self.plan is not None and self.plan != NO_SHARING

    @property
    def worst_task(self) -> str | None:
        """The task its bank keeps furthest from its adapter (highest KL)."""
        return max(self.tasks, key=lambda t: self.tasks[t].kl) if self.tasks else None

    def record(self) -> dict:
        return {
            "method": self.method, "budget": self.budget, "file_bytes": self.file_bytes, "storage_fraction": self.storage_fraction,
            "plan": self.plan, "mean_kl": self.mean_kl, "mean_agreement": self.mean_agreement, "worst_task": self.worst_task,
            "tasks": {t: dataclasses.asdict(f) for t, f in self.tasks.items()}, "infeasible": self.infeasible,
        }


def sweep(adapters: AdapterSet, methods: Iterable[str], budgets: list[Budget], model, tokenizer, texts: dict[str, list[Text]], fmt: NumberFormat | None = None,
          calibration: Calibration | None = None, on_step: OnStep | None = None, on_task: OnStep | None = None) -> list[SweepPoint]:
    """Each budgeted method (hydraopt, per-task, compeft) merged at every budget and each other method
    (one merged adapter: knots, ties, ...) once at its own storage (budget ``fixed``), then every
    feasible bank's fidelity to the adapters on ``texts`` (one pass of the model per distinct bank
    and batch: a plan two methods or budgets share is measured once). ``calibration``: the
    data-aware objective for the methods that take it. Progress: ``on_step`` over the merges'
    modules, ``on_task`` over the fidelity pass's tasks."""
    methods = [get_method(name) for name in dict.fromkeys(methods)]
    if not budgets and any(m.budgeted for m in methods):
        raise UserError("--budgets: give at least one budget")
    missing = [t for t in adapters.task_names if not texts.get(t)]
    if missing:
        raise UserError(f"--texts: no texts for task(s) {', '.join(missing)}")
    check_fits(model, adapters, "sweep")
    check_texts(tokenizer, texts)
    merged: list[tuple[str, str, MergedBank | Exception]] = []
    for i, method in enumerate(methods):
        config = MergeConfig(method.name, fmt=fmt, calibration=calibration if method.data_aware else None)
        part = part_of(on_step, i, len(methods))
        if method.budgeted:
            merged += [(method.name, b.label(), bank) for b, bank in zip(budgets, merge_budgets(adapters, config, budgets, part, strict=False))]
        else:
            merged.append((method.name, FIXED, merge(adapters, config, part)))
    banks = [bank for _, _, bank in merged if isinstance(bank, MergedBank)]
    measured = iter(fidelity_to_adapters(model, tokenizer, adapters, banks, texts, on_step=on_task))
    points = []
    for name, budget, bank in merged:
        if isinstance(bank, MergedBank):
            points.append(SweepPoint(name, budget, bank.total_file_bytes(), bank.storage_fraction(), plan_label(bank), next(measured)))
        else:
            points.append(SweepPoint(name, budget, None, None, None, {}, str(bank)))
    return points


def write_sweep(points: list[SweepPoint], adapters: AdapterSet, texts: dict[str, list[Text]], out: Path, overwrite: bool = False, inputs: Iterable[Path] = (), calibrated: bool = False, seconds: float | None = None) -> Path:
    """``sweep.json`` (every point, every task), ``sweep.md`` (one row per point) and ``sweep.png``
    (mean KL and agreement against storage, one line per method) in ``out``; ``seconds``: the
    sweep's wall time, recorded as is."""
    result = {
        "format": FORMAT,
        "measure": "per task, on its texts (a prompt/completion row: the completion's tokens only, given the prompt): kl = mean over next-token positions of KL(p_adapter || p_bank); agreement = share of positions where both predict the same token",
        "tasks": adapters.task_names,
        "texts": {t: len(texts[t]) for t in adapters.task_names},
        "calibration": calibrated,
        "seconds": seconds,
        "reference_file_bytes": adapters.reference_file_bytes(),
        "points": [p.record() for p in points],
    }
    with atomic_dir(out, overwrite, kind=SWEEP, inputs=list(inputs)) as tmp:
        (tmp / "sweep.json").write_text(json.dumps(result, indent=1, allow_nan=False))
        (tmp / "sweep.md").write_text(sweep_markdown(points, result["reference_file_bytes"]))
        _plot(points, tmp / "sweep.png")
    return out


def sweep_markdown(points: list[SweepPoint], reference_file_bytes: int) -> str:
    lines = [
        f"Storage: file bytes against every adapter stored as it is in fp16 ({reference_file_bytes:,} bytes). "
        "KL and agreement: each task's bank against its own adapter on the task's texts (no labels), mean over tasks.",
        "",
        "| method | budget | file bytes | storage | plan | mean KL | worst task (KL) | agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if p.infeasible is not None:
            lines.append(f"| {p.method} | {p.budget} | | | infeasible | | | |")
            continue
        worst = p.worst_task
        lines.append(f"| {p.method} | {p.budget} | {p.file_bytes:,} | {p.storage_fraction:.4f} | {p.plan} | {p.mean_kl:.4g} | {worst} ({p.tasks[worst].kl:.4g}) | {p.mean_agreement:.1%} |")
    return "\n".join(lines) + "\n"


def _plot(points: list[SweepPoint], png: Path) -> None:
    with figure(png, 2, figsize=(10, 3.8)) as (_, (ax_kl, ax_agree)):
        for method in dict.fromkeys(p.method for p in points):
            mine = sorted((p for p in points if p.method == method and p.infeasible is None), key=lambda p: p.storage_fraction)
            if not mine:
                continue
            x = [p.storage_fraction for p in mine]
            for ax, y in ((ax_kl, [max(p.mean_kl, 1e-6) for p in mine]), (ax_agree, [100 * p.mean_agreement for p in mine])):
                [line] = ax.plot(x, y, label=method)
                for xi, yi, p in zip(x, y, mine):  # filled: the plan shares factors; hollow: it shares none
                    ax.plot([xi], [yi], marker="o", color=line.get_color(), markerfacecolor=line.get_color() if p.shares_factors else "none")
        for ax in (ax_kl, ax_agree):
            ax.set_xscale("log")
            ax.set_xlabel("storage (fraction of the fp16 adapters' file bytes)")
            ax.grid(True, alpha=0.3)
        ax_kl.set_yscale("log")
        ax_kl.set_ylabel("mean KL to the adapters (lower is closer)")
        ax_agree.set_ylabel("same next token as the adapter (%)")
        ax_kl.legend()
        ax_kl.set_title("closeness to the adapters on your texts\n(filled: the plan shares factors; hollow: it shares none)", fontsize=10)
        ax_agree.set_title("next-token agreement")

