"""The planner's objective against per-task compression's, at the same budgets, on the suite's adapters.

What the frontier scores (frontier.py) is decided here first: at each budget the planner picks the
plan of least objective (the weighted squared reconstruction error of what is stored, data-free or
with calibration) among its options (merge/budgeted.py: plan_options). This script reports, per
init, objective and budget:

- ``hydraopt``: the objective of HydraOpt's plan, and how many modules share a factor in it;
- ``prefix_only``: what the plan of every candidate by the gain-sorted prefix alone gave (the rule
  before ``allocator.allocate_best``), and whether today's plan differs from it;
- ``per_task``: the objective of ``--method per-task``'s plan at the same budget, and
  ``gain_pct``, how much lower HydraOpt's objective is (0 where the plans are the same).

No scores: the objective is the planner's own proxy; frontier.json has the scores of these plans.

    python benchmarks/planner_objective.py [--adapters-indep /work/adapters-indep] [--threads 2]

Writes benchmarks/results/planner_objective.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import RESULTS_DIR, SUITE_ADAPTERS, adapter_digests  # first: it puts this checkout on sys.path

from hydraopt_mobile.adapters import AdapterSet, load_adapter_folders
from hydraopt_mobile.app.progress import progress_bar
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.calibration import Calibration, collect
from hydraopt_mobile.formats import FORMAT_NAMES, NumberFormat
from hydraopt_mobile.merge.allocator import Candidate, allocate
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.budgeted import payload_budget, plan_budget
from hydraopt_mobile.merge.candidates import HydraOptConfig, plan_candidates
from hydraopt_mobile.suite.calibration_texts import calibration_texts
from hydraopt_mobile.suite.model import load_base_model
from hydraopt_mobile.suite.tasks import load_suite

CALIBRATION_PER_TASK = 16  # as frontier.py


def objective(plan: dict[str, Candidate]) -> float:
    return sum(c.error for c in plan.values())


def prefix_only(candidates: dict[str, list[Candidate]], budget: Budget, reference: int, n_tasks: int) -> dict[str, Candidate] | None:
    """The plan of every candidate by :func:`allocate` alone, with the payload budget
    :func:`budgeted.plan_budget` gives the planner."""
    try:
        return allocate(candidates, payload_budget(budget.resolve(reference), n_tasks))
    except InfeasibleBudget:
        return None


def rows_for(init: str, adapters: AdapterSet, calibration: Calibration | None, fractions: list[float]) -> list[dict]:
    T = len(adapters.tasks)
    cfg = HydraOptConfig(formats=tuple(NumberFormat(name) for name in FORMAT_NAMES), calibration=calibration)
    with progress_bar(f"{init}: hydraopt candidates") as on_step:
        ours = plan_candidates(adapters, cfg, on_step)
    with progress_bar(f"{init}: per-task candidates") as on_step:
        theirs = plan_candidates(adapters, replace(cfg, per_task=True), on_step)
    reference = adapters.reference_file_bytes()
    rows = []
    for fraction in fractions:
        budget = Budget(fraction=fraction)
        plan, rival, before = plan_budget(ours, budget, reference, T), plan_budget(theirs, budget, reference, T), prefix_only(ours, budget, reference, T)
        row: dict = {"init": init, "calibration": calibration is not None, "budget": fraction}
        if isinstance(plan, InfeasibleBudget):
            rows.append(row | {"infeasible": str(plan)})
            continue
        row |= {"hydraopt": objective(plan), "sharing_modules": sum(c.k_a < T or c.k_b < T for c in plan.values()), "payload_bytes": sum(c.nbytes for c in plan.values())}
        if before is not None:
            row |= {"prefix_only": objective(before), "changed_by_allocate_best": any(before[m].spec != plan[m].spec for m in plan)}
        if not isinstance(rival, InfeasibleBudget):
            row |= {"per_task": objective(rival), "gain_pct": 100 * (objective(rival) - objective(plan)) / objective(rival), "same_plan_as_per_task": all(rival[m].spec == plan[m].spec for m in plan)}
        rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# The planner's objective against per-task compression's, same budgets", "",
             "Objective: the weighted squared reconstruction error of what is stored, summed over modules (data-free, or with "
             f"calibration: {CALIBRATION_PER_TASK} train examples per task). `gain %`: how much lower HydraOpt's is than "
             "`--method per-task`'s plan at the same budget. `prefix only`: the plan of every candidate by the gain-sorted "
             "prefix alone (the rule before `allocator.allocate_best`). Scores of these plans: frontier.json.", "",
             f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), {meta['seconds']:.0f} s.", ""]
    table = []
    for r in rows:
        if "infeasible" in r:
            table.append([r["init"], "calibrated" if r["calibration"] else "data-free", r["budget"], "infeasible", "", "", "", "", ""])
            continue
        table.append([r["init"], "calibrated" if r["calibration"] else "data-free", r["budget"], f"{r['hydraopt']:.5f}", r["sharing_modules"],
                      f"{r['prefix_only']:.5f}" if "prefix_only" in r else "-", "yes" if r.get("changed_by_allocate_best") else "no",
                      f"{r['per_task']:.5f}" if "per_task" in r else "infeasible", f"{r['gain_pct']:+.3f}" if "gain_pct" in r else "-"])
    lines += markdown_table(["init", "objective", "budget", "HydraOpt", "modules sharing", "prefix only", "plan changed", "per-task", "gain %"], table)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters-indep", type=Path, default=None, help="folder holding independent-seeds/<task>/ (not in the repository: hydraopt suite train --init independent-seeds); without it, shared-seed only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "planner_objective.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    inits = [("shared-seed", SUITE_ADAPTERS / "shared-seed")] + ([("independent-seeds", args.adapters_indep / "independent-seeds")] if args.adapters_indep else [])
    model, tokenizer = load_base_model()
    tasks = load_suite()
    rows, digests = [], {}
    for init, folder in inits:
        adapters = load_adapter_folders(folder)
        digests[init] = adapter_digests(folder)
        T = len(adapters.tasks)
        fractions = [round(0.5 / T, 4), round(1.0 / T, 4), 0.15, 0.3, 0.52]
        suite = [t for t in tasks if t.name in adapters.task_names]
        calibration = collect(model, tokenizer, adapters, calibration_texts(suite, tokenizer, CALIBRATION_PER_TASK))
        rows += rows_for(init, adapters, None, fractions) + rows_for(init, adapters, calibration, fractions)
    meta = {"machine": platform.machine(), "torch": torch.__version__, "threads": args.threads, "seconds": time.perf_counter() - t0, "adapters_sha256": digests}
    write_record(args.out, {"meta": meta, "records": rows}, markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
