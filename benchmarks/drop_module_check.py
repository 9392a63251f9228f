"""Would leaving whole modules out help the planner at tight budgets? (issue 16, the 1/(2T) target.)

At 1/(2T) of the fp16 bytes every module still gets some factors. A module left out costs no bytes
and leaves its whole update as error (``sum_t w_t ||dW_t||^2``, in the objective's own weights), so
it is one more candidate per module: rank 0. This check adds that candidate to the planner's
candidates of every module (nothing else changes) and runs the allocator at 1/(2T), 1/T and the int4
baselines' 0.0234, with and without it: the objective (the sum of per-task relative errors, out of
T) and the modules left out. Nothing is merged or evaluated: if the objective hardly moves, rank 0
is not worth the bank, export and ``add`` support it would need.

    python benchmarks/drop_module_check.py [--init shared-seed] [--data-free] [--threads 2]

Default: the data-aware objective with the frontier's calibration (16 train examples per task).
Writes ``benchmarks/results/drop_module_check.{json,md}``.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import RESULTS_DIR, SUITE_ADAPTERS  # first: it puts this checkout on sys.path

from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.calibration import collect
from hydraopt_mobile.factored import factor_space
from hydraopt_mobile.formats import FORMAT_NAMES, NumberFormat
from hydraopt_mobile.merge.allocator import Candidate
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.budgeted import plan_budget
from hydraopt_mobile.merge.candidates import HydraOptConfig, plan_candidates, task_weights
from hydraopt_mobile.parallel import one_thread_per_op
from hydraopt_mobile.suite.calibration_texts import calibration_texts
from hydraopt_mobile.suite.model import load_base_model
from hydraopt_mobile.suite.tasks import load_suite

from frontier import CALIBRATION_PER_TASK  # the frontier's calibration size

BUDGETS = (0.0417, 0.0833, 0.0234)  # 1/(2T), 1/T, the int4 baselines' bytes (frontier.md)
DROP = "left out"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default="shared-seed")
    ap.add_argument("--data-free", action="store_true", help="the data-free objective (default: data-aware, the frontier's calibration)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapters = load_adapter_folders(SUITE_ADAPTERS / args.init)
    calibration = None
    if not args.data_free:
        model, tokenizer = load_base_model()
        suite = [t for t in load_suite() if t.name in adapters.task_names]
        calibration = collect(model, tokenizer, adapters, calibration_texts(suite, tokenizer, CALIBRATION_PER_TASK))
    cfg = HydraOptConfig(formats=tuple(NumberFormat(name) for name in FORMAT_NAMES), calibration=calibration)
    t0 = time.perf_counter()
    with one_thread_per_op():
        weights = task_weights(adapters, calibration)
        candidates = plan_candidates(adapters, cfg, weights=weights)
        whole = {name: float((weights * factor_space(adapters.factors(name), cfg.moments(name)).sq_norms).sum()) for name in adapters.module_names}
    plan_s = time.perf_counter() - t0
    T = len(adapters.tasks)
    reference = adapters.reference_file_bytes()
    records = []
    for fraction in BUDGETS:
        for with_drop in (False, True):
            cands = {m: c + ([Candidate(T, T, 0, DROP, 0, whole[m])] if with_drop else []) for m, c in candidates.items()}
            chosen = plan_budget(cands, Budget(fraction=fraction), reference, T)  # what merge/budgeted.py gives the allocator
            assert not isinstance(chosen, InfeasibleBudget), chosen
            left_out = sorted(m for m, c in chosen.items() if c.fmt == DROP)
            records.append({"budget": fraction, "rank0_candidate": with_drop, "objective": sum(c.error for c in chosen.values()),
                            "objective_max": float(sum(whole.values())), "planned_bytes": sum(c.nbytes for c in chosen.values()),
                            "modules_left_out": len(left_out), "left_out": left_out})
    for r in records:
        base = next(b for b in records if b["budget"] == r["budget"] and not b["rank0_candidate"])
        r["objective_change_pct"] = 100 * (r["objective"] / base["objective"] - 1)
    notes = {"what": "the planner's allocator with and without a rank-0 (module left out) candidate per module; objective = sum over tasks of relative errors (out of T)",
             "init": args.init, "objective_kind": "data-free" if args.data_free else f"data-aware ({CALIBRATION_PER_TASK} train examples per task)",
             "tasks": T, "modules": len(candidates), "candidates_s": plan_s, "threads": args.threads}
    rows = [[r["budget"], "yes" if r["rank0_candidate"] else "no", f"{r['objective']:.4f}", f"{r['objective_change_pct']:+.2f}", r["modules_left_out"], ", ".join(m.replace("model.layers.", "L").replace(".self_attn.", ".") for m in r["left_out"])] for r in records]
    md = "# Leaving modules out at tight budgets (benchmarks/drop_module_check.py)\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in notes.items()) + "\n\n"
    md += "\n".join(markdown_table(["budget (of fp16 bytes)", "rank-0 candidate", "objective", "change %", "modules left out", "which"], rows, align="rlrrrl")) + "\n"
    write_record(RESULTS_DIR / f"drop_module_check{'_data_free' if args.data_free else ''}.json", {"notes": notes, "records": records}, md)
    print(md)


if __name__ == "__main__":
    main()
