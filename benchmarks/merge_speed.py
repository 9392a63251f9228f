"""Merge speed: 40 synthetic adapters at Llama-3.2-1B attention shapes, HydraOpt at three budgets.

Reports wall time and peak RSS of the whole merge (all candidates, three budgets), and the speed
ratio against a dense reference (the same closed form and ALS on dense d_out x d_in updates), run
side by side in this script on the same modules. The dense reference is run on a few modules
only (it takes minutes per module); the ratio is per module, like for like.

    python benchmarks/merge_speed.py [--tasks 40] [--layers 16] [--dense-modules 2] [--threads 2] [--rounds 1]

``--rounds N`` merges N times in this process and reports the median (``merge_s_rounds`` has each
round; every round must give the same file bytes); the default of one round is what
merge_speed_side_by_side.py runs for each revision.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import machine_probe  # first: it puts this checkout on sys.path

from hydraopt_mobile.adapters import LoraFactors, build_adapter_set, load_adapter
from hydraopt_mobile.app.progress import progress_bar
from hydraopt_mobile.factored import factor_space
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.solver import solve_layout
from hydraopt_mobile.merge.registry import MergeConfig, merge_budgets
from hydraopt_mobile.sharing import layout_summary, plan_label
from hydraopt_mobile.synthetic import llama_shapes, planted_factors, write_peft_adapter

RESULTS = Path(__file__).parent / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dense_reference(factors: list[LoraFactors], w: torch.Tensor, a_index: list[int], b_index: list[int], rank: int, iters: int) -> float:
    """The same objective solved on dense updates: Gram eigendecomposition start, then dense ALS."""
    dW = torch.stack([f.dense().double() for f in factors])  # (T, d_out, d_in)
    k_a, k_b = max(a_index) + 1, max(b_index) + 1
    A = []
    for g in range(k_a):
        members = [t for t in range(len(factors)) if a_index[t] == g]
        gram = sum(w[t] * dW[t].T @ dW[t] for t in members)
        A.append(torch.linalg.eigh(gram)[1][:, -rank:].T)
    A = torch.stack(A)

    def solve_B():
        return torch.stack([
            sum(w[t] * dW[t] @ A[a_index[t]].T for t in range(len(factors)) if b_index[t] == h)
            @ torch.linalg.pinv(sum(w[t] * A[a_index[t]] @ A[a_index[t]].T for t in range(len(factors)) if b_index[t] == h))
            for h in range(k_b)
        ])

    B = solve_B()
    for _ in range(iters):
        A = torch.stack([
            torch.linalg.pinv(sum(w[t] * B[b_index[t]].T @ B[b_index[t]] for t in range(len(factors)) if a_index[t] == g))
            @ sum(w[t] * B[b_index[t]].T @ dW[t] for t in range(len(factors)) if a_index[t] == g)
            for g in range(k_a)
        ])
        B = solve_B()
    return float(sum(w[t] * ((dW[t] - B[b_index[t]] @ A[a_index[t]]) ** 2).sum() for t in range(len(factors))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dense-modules", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="merges in a row; the median is reported")
    ap.add_argument("--out", type=Path, default=RESULTS / "merge_speed.json")
    args = ap.parse_args()
    probe = machine_probe()
    torch.set_num_threads(args.threads)
    shapes = llama_shapes(args.layers, 2048, 512)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {args.tasks} synthetic adapters ({len(shapes)} modules, r={args.rank}) ...", file=sys.stderr)
        paths = [write_peft_adapter(Path(tmp) / f"t{t:02d}", f, args.rank, 2 * args.rank) for t, f in enumerate(planted_factors(shapes, args.tasks, args.rank, noise=0.3, seed=0))]
        rss_before = peak_rss_mb()
        t0 = time.perf_counter()
        adapters = build_adapter_set([load_adapter(p) for p in paths])
        t_load = time.perf_counter() - t0
    budgets = [Budget(fraction=f) for f in (0.15, 0.3, 0.5)]
    rounds: list[float] = []
    bytes_per_round: list[list[int]] = []
    banks: list = []
    for _ in range(args.rounds):
        banks = []  # the previous round's banks are not kept through this one
        t0 = time.perf_counter()
        with progress_bar("hydraopt: modules") as on_step:
            banks = merge_budgets(adapters, MergeConfig("hydraopt"), budgets, on_step)
        rounds.append(time.perf_counter() - t0)
        bytes_per_round.append([bank.total_file_bytes() for bank in banks])
    if any(b != bytes_per_round[0] for b in bytes_per_round):
        raise SystemExit(f"merge_speed: the rounds gave different file bytes: {bytes_per_round}")
    t_merge = statistics.median(rounds)
    rss_merge = peak_rss_mb()

    # side by side, like for like: one shared A (closed form) and a 4-group ALS layout, r' = r
    layouts = [("1xT closed form", [0] * args.tasks, list(range(args.tasks)), 0), ("4x8 ALS (10 iters)", [t % 4 for t in range(args.tasks)], [t % 8 for t in range(args.tasks)], 10)]
    w = torch.ones(args.tasks, dtype=torch.float64)
    compare = []
    for name in adapters.module_names[: args.dense_modules]:
        factors = adapters.factors(name)
        for label, a_idx, b_idx, iters in layouts:
            t0 = time.perf_counter()
            sol = solve_layout(factor_space(factors), w, a_idx, b_idx, args.rank, max_iters=iters, tol=0.0)
            t_fact = time.perf_counter() - t0
            t0 = time.perf_counter()
            dense_obj = dense_reference(factors, w, a_idx, b_idx, args.rank, iters)
            t_dense = time.perf_counter() - t0
            compare.append({"module": name, "layout": label, "factored_s": t_fact, "dense_s": t_dense, "speedup": t_dense / t_fact, "objective_factored": sol.history[-1], "objective_dense": dense_obj})
            print(f"{name} {label}: factored {t_fact:.3f}s dense {t_dense:.2f}s x{t_dense / t_fact:.0f}", file=sys.stderr)
    result = {
        "setup": {"tasks": args.tasks, "modules": len(shapes), "shapes": f"Llama-3.2-1B attention (hidden 2048, kv 512), {args.layers} layers, q/k/v/o", "rank": args.rank, "threads": args.threads, "machine": f"{platform.machine()} {torch.get_num_threads()} torch thread(s)", "torch": torch.__version__, "machine_probe": probe},
        "load_average_1_5_15": os.getloadavg(),  # other processes on the same 2 cores slow every number here
        "load_s": t_load,
        "merge_s_three_budgets": t_merge,  # the median of merge_s_rounds
        "merge_s_rounds": rounds,
        "peak_rss_mb": rss_merge,
        "peak_rss_mb_before_merge": rss_before,
        "budgets": [
            {"budget": b.label(), "file_bytes": bank.total_file_bytes(), "reference_file_bytes": bank.reference_file_bytes, "storage_fraction": bank.storage_fraction(), "payload_bytes": bank.payload_bytes(), "plan": plan_label(bank), "layout_summary": layout_summary(bank), "mean_rel_error": statistics.mean(bank.rel_errors.values())}
            for b, bank in zip(budgets, banks)
        ],
        "dense_vs_factored": compare,
        "median_speedup": statistics.median(c["speedup"] for c in compare) if compare else None,
        "targets": {"merge_at_most_10s": t_merge <= 10, "rss_at_most_1.5GB": rss_merge <= 1536, "speedup_at_least_10x": bool(compare) and min(c["speedup"] for c in compare) >= 10},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("merge_s_three_budgets", "peak_rss_mb", "median_speedup", "targets", "budgets")}, indent=1))


if __name__ == "__main__":
    main()
