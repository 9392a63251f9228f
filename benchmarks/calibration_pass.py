"""Time the calibration pass of the data-aware merge on the suite: 12 tasks x 16 train examples
through the base SmolLM2-135M with forward hooks at every adapted Linear, moments projected into
each module's span(Q); then the data-aware merge (``hydraopt merge --calibration``'s default),
HydraOpt at 1/T, against what ``--choose kl`` adds on top, the KL choice between the data-aware and
the data-free plan (objective_choice.py: both merges and the fidelity pass over the same texts). Run it
alone (``flock -x``): the numbers are durations.

    python benchmarks/calibration_pass.py [--threads 1] [--repeats 3]

Writes ``benchmarks/results/calibration_pass.json``: model load, text preparation, the pass itself
and the merges (medians of ``--repeats``), tokens, threads and the load average when it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from common import RESULTS_DIR, SUITE_ADAPTERS  # first: it puts this checkout on sys.path

from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.calibration import collect
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge_budgets
from hydraopt_mobile.objective_choice import ObjectiveChoice, merge_choosing
from hydraopt_mobile.suite.calibration_texts import calibration_texts
from hydraopt_mobile.suite.model import load_base_model
from hydraopt_mobile.suite.tasks import load_suite



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-task", type=int, default=16)
    ap.add_argument("--init", default="shared-seed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapters = load_adapter_folders(SUITE_ADAPTERS / args.init)
    t0 = time.perf_counter()
    model, tokenizer = load_base_model()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = calibration_texts([t for t in load_suite() if t.name in adapters.task_names], tokenizer, args.per_task)
    texts_s = time.perf_counter() - t0
    runs, cal = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        cal = collect(model, tokenizer, adapters, texts)
        runs.append(time.perf_counter() - t0)
    assert cal is not None
    config, budgets = MergeConfig("hydraopt", calibration=cal), [Budget(fraction=round(1 / len(adapters.tasks), 4))]
    aware_runs, choice_runs, kept = [], [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        merge_budgets(adapters, config, budgets)
        aware_runs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        [bank] = merge_choosing(adapters, config, budgets, model, tokenizer, texts, ObjectiveChoice("kl"))
        choice_runs.append(time.perf_counter() - t0)
        kept = bank.params["choice"]
    result = {
        "setup": f"{len(texts)} tasks x {args.per_task} train examples, SmolLM2-135M fp32, hooks on {len(adapters.module_names)} Linears, "
        f"{args.threads} torch thread(s), {platform.machine()}, load average {os.getloadavg()[0]:.1f} at the end",
        "tokens": sum(cal.tokens.values()),
        "calibration_pass_s_median": statistics.median(runs),
        "calibration_pass_s_runs": runs,
        "model_load_s": load_s,
        "texts_s": texts_s,
        "total_first_run_s": load_s + texts_s + runs[0],
        "target_s": 120,
        "data_aware_merge_s_median": statistics.median(aware_runs),
        "kl_choice_merge_s_median": statistics.median(choice_runs),
        "kl_choice_merge_s_runs": choice_runs,
        "kl_choice_setup": f"hydraopt at {budgets[0].label()}: both plans merged, then KL(adapter || bank) over the same texts for both banks, each task's reference once",
        "kl_choice_kept": kept,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "calibration_pass.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
