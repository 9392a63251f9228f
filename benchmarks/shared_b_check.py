"""Shared-B layouts (one B per group of tasks, an A per task): would the planner choose them?

Issue 16 asks to consider layouts the family allows and the planner does not try; the planner's
layouts share A's first (``candidates.candidate_layouts``: k_A <= k_B), because A's are the more
alike factor (METHOD.md). This script prices the other side without adding it to the library: the
shared-B problem is the shared-A problem of the transposed updates (``dW_t^T = A_t^T B_t^T``), so the
planner's own candidates of the transposed adapters at layouts (1, k) are the layouts (k, 1) here.
With calibration, ``||(B_t a_t - B^ a^_t) L_t||^2`` (``Q^T S_t Q = L_t L_t^T``, A^_t free per task in
span(Q)) is the data-free shared-B problem on ``(B_t, a_t L_t)``: exact for the float solution; the
quantisation noise is priced on the whitened q-long vectors instead of the d_in-long rows stored, and
the candidates' bytes are re-priced at the real d_in. Those candidates join the planner's own at
each budget, and the allocator (``budgeted.plan_budget``) plans again: the objective it reaches,
how many modules take a shared B, and on how many modules' lower hulls a shared-B candidate lies.

    python benchmarks/shared_b_check.py [--adapters ROOT] [--init shared-seed --init independent-seeds]

Writes benchmarks/results/shared_b_check.{json,md}; 1 thread (the frontier's banks).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import torch

from common import RESULTS_DIR, SUITE_ADAPTERS  # first: it puts this checkout on sys.path

from frontier import CALIBRATION_PER_TASK
from hydraopt_mobile.adapters import AdapterSet, LoraFactors, TaskAdapter, build_adapter_set, load_adapter_folders
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.calibration import Calibration, collect
from hydraopt_mobile.factored import factor_space, ridged_cholesky
from hydraopt_mobile.formats import FORMAT_NAMES, NumberFormat
from hydraopt_mobile.merge.allocator import Candidate, lower_hull
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.budgeted import plan_budget
from hydraopt_mobile.merge.candidates import AS_IS, HydraOptConfig, plan_candidates, task_weights
from hydraopt_mobile.suite.calibration_texts import calibration_texts
from hydraopt_mobile.suite.model import load_base_model
from hydraopt_mobile.suite.tasks import load_suite

FORMATS = tuple(NumberFormat(name, 32) for name in FORMAT_NAMES)  # the planner's default formats


def transposed(adapters: AdapterSet, calibration: Calibration | None) -> AdapterSet:
    """Each task's factors transposed (A' = B^T, B' = A^T); with calibration, A_t first taken into
    Q coordinates and whitened by its own moment (``a_t L_t``)."""
    modules: list[dict[str, LoraFactors]] = [{} for _ in adapters.task_names]
    for name in adapters.module_names:
        factors = adapters.factors(name)
        fm = factor_space(factors, calibration.modules[name]) if calibration is not None else None
        for t, f in enumerate(factors):
            a = f.A if fm is None else (fm.a[t] @ ridged_cholesky(fm.S[t])).to(f.A.dtype)
            modules[t][name] = LoraFactors(A=f.B.T.contiguous(), B=a.T.contiguous())
    return build_adapter_set([TaskAdapter(name=n, path=Path(n), base_model=None, modules=modules[t]) for t, n in enumerate(adapters.task_names)])


def shared_b_candidates(adapters: AdapterSet, calibration: Calibration | None, weights: torch.Tensor) -> dict[str, list[Candidate]]:
    """The transposed problem's (1, k) candidates as (k, 1) ones here, priced at this module's shape."""
    there = plan_candidates(transposed(adapters, calibration), HydraOptConfig(formats=FORMATS, k_a=1), weights=weights)
    def here(name: str, c: Candidate) -> Candidate:
        (d_out, d_in), fmt = adapters.shapes[name], NumberFormat.parse(c.fmt)
        return dataclasses.replace(c, k_a=c.k_b, k_b=c.k_a, groups=None, a_rows=0, nbytes=c.k_b * fmt.nbytes(c.rank, d_in) + c.k_a * fmt.nbytes(c.rank, d_out))

    return {name: [here(name, c) for c in cands if c.rank != AS_IS and c.k_a == 1] for name, cands in there.items()}


def shares_b(c: Candidate) -> bool:
    return c.k_b < c.k_a


def check(adapters: AdapterSet, calibration: Calibration | None) -> list[dict]:
    T = len(adapters.tasks)
    weights = task_weights(adapters, calibration)
    own = plan_candidates(adapters, HydraOptConfig(formats=FORMATS, calibration=calibration), weights=weights)
    extra = shared_b_candidates(adapters, calibration, weights)
    union = {name: own[name] + extra[name] for name in own}
    on_hull = sum(any(shares_b(c) for c in lower_hull(cands)) for cands in union.values())
    rows = []
    for fraction in (0.0234, round(0.5 / T, 4), round(1 / T, 4), 0.15):
        plans = [plan_budget(c, Budget(fraction=fraction), adapters.reference_file_bytes(), T) for c in (own, union)]
        if not all(isinstance(p, dict) for p in plans):
            continue
        mine, with_b = (sum(c.error for c in p.values()) for p in plans)
        rows.append({"budget": fraction, "objective_planner": mine, "objective_with_shared_b": with_b, "change_pct": 100 * (with_b / mine - 1),
                     "modules_sharing_b": sum(shares_b(c) for c in plans[1].values()), "modules": len(own), "modules_with_shared_b_on_hull": on_hull})
    return rows


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = ["# Shared-B layouts against the planner's candidates", "",
             "The planner's objective at each budget with its own candidates and with shared-B layouts added (one B per group of tasks, "
             "an A per task; the transposed problem's shared-A candidates, benchmarks/shared_b_check.py). Calibrated: the quantisation "
             "noise of shared-B candidates is priced on whitened vectors (an approximation); the float errors are exact.", "",
             f"{m['machine']}, torch {m['torch']}, {m['threads']} thread, {m['seconds']:.0f} s.", ""]
    rows = [[r["init"], r["objective"], f"{r['budget']:.4f}", f"{r['objective_planner']:.5g}", f"{r['objective_with_shared_b']:.5g}", f"{r['change_pct']:+.2f} %",
             f"{r['modules_sharing_b']} / {r['modules']}", f"{r['modules_with_shared_b_on_hull']} / {r['modules']}"] for r in data["records"]]
    lines += markdown_table(["init", "objective", "budget", "planner", "with shared B", "change", "modules sharing a B", "modules with a shared-B candidate on the hull"], rows, align="lllrrrrr")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=Path, action="append", help="folders holding <init>/<task>/ adapters (repeatable; default the suite's)")
    ap.add_argument("--init", action="append", help="inits to check (default: every init folder found)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tokenizer = load_base_model()
    records = []
    for root in args.adapters or [SUITE_ADAPTERS]:
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and (not args.init or p.name in args.init)):
            adapters = load_adapter_folders(folder)
            suite = [t for t in load_suite() if t.name in adapters.task_names]
            calibration = collect(model, tokenizer, adapters, calibration_texts(suite, tokenizer, CALIBRATION_PER_TASK))
            for label, cal in (("data-free", None), ("data-aware", calibration)):
                for row in check(adapters, cal):
                    records.append({"init": folder.name, "objective": label, **row})
                    print(records[-1], flush=True)
    meta = {"machine": platform.machine(), "torch": torch.__version__, "threads": 1, "seconds": time.perf_counter() - t0,
            "calibration": f"train examples 0-{CALIBRATION_PER_TASK - 1} per task (the frontier's)"}
    data = {"meta": meta, "records": records}
    write_record(RESULTS_DIR / "shared_b_check.json", data, markdown(data))


if __name__ == "__main__":
    main()
