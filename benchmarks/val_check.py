"""HydraOpt against per-task compression at 1/(2T) and 1/T on the validation split: do the test
split's differences (frontier.json) hold on examples nothing was chosen or fitted on?

The frontier's HydraOpt-vs-per-task differences at the tight budgets are a point or less with 95 %
intervals of about +-1.5 points on the test split's 576 examples, so their signs may be noise. This
script merges the same banks (data-free, and with the frontier's calibration: the data-aware plan),
checks each is the frontier's bank (file bytes and every task's relative error), scores them on the
validation split (30 examples per task; used by no training, calibration or choice here) and reports
HydraOpt minus per-task with its 95 % paired bootstrap interval beside the test split's. It changes
no verdict: the targets are on the test split.

    python benchmarks/val_check.py --init shared-seed [--adapters ROOT] [--threads 1]
    python benchmarks/val_check.py --pool

Writes benchmarks/results/val_check_<init>.{json,md}; run it on the frontier's thread count (1) and
machine type, else the calibrated banks are other banks (their rows then say so). ``--pool`` reads
both inits' records (no model, no merge) and writes val_check_pooled.{json,md}: per method, the
data-aware plan minus the data-free one, and the KL choice (the plan frontier.json says it kept)
minus the data-aware plan, each averaged over the four init x budget cases with one interval: the
evidence ``hydraopt merge --calibration``'s default (``--choose``) is decided on.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from common import RESULTS_DIR, SUITE_ADAPTERS, is_record_of  # first: it puts this checkout on sys.path

from frontier import CALIBRATION_PER_TASK, INITS
from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.app.frontier import Point, banks_for, load_records
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.calibration import collect
from hydraopt_mobile.sharing import layout_summary
from hydraopt_mobile.suite.calibration_texts import calibration_texts
from hydraopt_mobile.suite.evaluate import evaluate
from hydraopt_mobile.suite.metrics import as_gain, paired_drop, per_example, pooled_paired_drop
from hydraopt_mobile.suite.model import cache_root, load_base_model
from hydraopt_mobile.suite.tasks import load_suite

SPLIT = "val"


def difference(per_task: dict[str, list[float]], hydraopt: dict[str, list[float]]) -> dict:
    """HydraOpt minus per-task (or any second scores minus the first), points, with the 95 % paired interval."""
    return as_gain(paired_drop(per_task, hydraopt))


def _diff(d: dict) -> str:
    return f"{d['points'] + 0.0:+.2f} [{d['ci95'][0] + 0.0:+.2f}, {d['ci95'][1] + 0.0:+.2f}]"  # + 0.0: no "-0.00"


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [f"# HydraOpt - per-task on the validation split ({m['init']})", "",
             f"{m['examples_per_task']} validation examples per task ({m['tasks']} tasks) against the test split's differences (frontier.json, the same banks); "
             "points, 95 % paired bootstrap intervals. *another bank*: this run's bank is not the frontier's.", "",
             f"{m['machine']}, torch {m['torch']}, {m['threads']} thread(s), {m['seconds']:.0f} s.", ""]
    rows = []
    for r in data["records"]:
        test = "another bank" if r["test"] is None else _diff(r["test"])
        rows.append([f"{r['budget']:.4f}", r["objective"], r["hydraopt_sharing_modules"], f"{r['hydraopt_val_score']:.2f}", f"{r['per_task_val_score']:.2f}",
                     _diff(r["val"]), test])
    lines += markdown_table(["budget", "objective", "HydraOpt modules sharing", "HydraOpt val", "per-task val", "HydraOpt - per-task, val", "HydraOpt - per-task, test"], rows, align="llrrrll")
    lines += ["", "The data-aware plan minus the data-free plan of each method on the validation split (the same banks; points, 95 % paired intervals):", ""]
    by = {(r["budget"], r["objective"]): r for r in data["records"]}
    rows = [[f"{budget:.4f}", *(_diff(difference(by[budget, "data-free"][key], by[budget, "data-aware"][key])) for key in ("hydraopt_val_examples", "per_task_val_examples"))]
            for budget in sorted({b for b, _ in by}) if (budget, "data-free") in by and (budget, "data-aware") in by]
    lines += markdown_table(["budget", "HydraOpt", "per-task"], rows)
    return "\n".join(lines) + "\n"


Plan = Callable[[str, float], str]  # (init, budget) -> the objective of the bank scored


def pooled(records: list[dict], key: str, plus: Plan, minus: Plan) -> dict:
    """One method's bank ``plus`` minus its bank ``minus``, averaged over the (init, budget) cases
    of ``records``, with one 95 % paired interval (metrics.pooled_paired_drop: every case scores
    the same validation examples)."""
    by = {(r["init"], r["budget"], r["objective"]): r[key] for r in records}
    cases = sorted({(init, budget) for init, budget, _ in by})
    return as_gain(pooled_paired_drop([(by[i, b, minus(i, b)], by[i, b, plus(i, b)]) for i, b in cases])) | {"cases": [list(c) for c in cases]}


def pool(out: Path) -> None:
    """val_check_pooled.{json,md} from both inits' records and frontier.json's KL choices."""
    records = [r | {"init": init} for init in INITS for r in json.loads((RESULTS_DIR / f"val_check_{init}.json").read_text())["records"]]
    frontier = [r for r in load_records(RESULTS_DIR / "frontier.json") if r.get("choice") == "kl"]
    rows = []
    for method, key in (("hydraopt", "hydraopt_val_examples"), ("per-task", "per_task_val_examples")):
        kept = {(r["init"], r["budget"]): r["kept_objective"] for r in frontier if r["method"] == method}
        rows.append({"method": method, "data_aware_minus_data_free": pooled(records, key, lambda i, b: "data-aware", lambda i, b: "data-free"),
                     "kl_choice_minus_data_aware": pooled(records, key, lambda i, b: kept[i, b], lambda i, b: "data-aware"), "kl_kept": {f"{i} {b}": o for (i, b), o in sorted(kept.items())}})
    data = {"meta": {"split": SPLIT, "sources": [f"val_check_{init}.json" for init in INITS] + ["frontier.json (kept_objective of the KL choice)"]}, "records": rows}
    lines = ["# The calibrated plans on the validation split, pooled over inits and budgets", "",
             "Per method, averaged over the four cases (shared-seed and independent-seeds, 1/(2T) and 1/T; "
             "30 validation examples x 12 tasks, the same examples in every case): points with a 95 % paired bootstrap interval "
             "(each example's score averaged over the cases, then resampled within tasks).", ""]
    lines += markdown_table(["method", "data-aware - data-free", "KL choice - data-aware", "plan the KL choice kept (init budget)"],
                            [[r["method"], _diff(r["data_aware_minus_data_free"]), _diff(r["kl_choice_minus_data_aware"]), ", ".join(f"{k}: {v}" for k, v in r["kl_kept"].items())] for r in rows])
    write_record(out, data, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", choices=INITS)
    ap.add_argument("--pool", action="store_true", help="only pool both inits' records into val_check_pooled.{json,md}")
    ap.add_argument("--adapters", type=Path, default=SUITE_ADAPTERS, help="folder holding <init>/<task>/ PEFT adapters")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/val_check_<init>.json")
    ap.add_argument("--report", action="store_true", help="only rewrite the .md beside --out from it")
    args = ap.parse_args()
    if args.pool:
        return pool(args.out or RESULTS_DIR / "val_check_pooled.json")
    if args.init is None:
        ap.error("--init is required (or --pool)")
    out = args.out or RESULTS_DIR / f"val_check_{args.init}.json"
    if args.report:
        data = json.loads(out.read_text())
        write_record(out, data, markdown(data))
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_base_model()
    adapters = load_adapter_folders(args.adapters / args.init)
    suite = [t for t in load_suite() if t.name in adapters.task_names]
    frontier = [r for r in load_records(RESULTS_DIR / "frontier.json") if r["init"] == args.init and "examples" in r]
    T = len(adapters.tasks)
    points = [Point(method, round(f / T, 4), calibration=cal, choice="data-aware" if cal else None) for f in (0.5, 1.0) for cal in (False, True) for method in ("hydraopt", "per-task")]
    bank_of = banks_for(adapters, points, functools.cache(lambda: collect(model, tokenizer, adapters, calibration_texts(suite, tokenizer, CALIBRATION_PER_TASK))))
    answers = cache_root() / "answers"

    def scored(point: Point) -> tuple[object, dict[str, list[float]], dict | None]:
        bank = bank_of(point)
        predictions: dict[str, list[str]] = {}
        evaluate(suite, {t: bank.task_factors(t) for t in bank.tasks}, model, tokenizer, split=SPLIT, cache=answers, predictions=predictions)
        record = next((r for r in frontier if (r["method"], r["budget"], r["format"], r.get("at"), r["calibration"], r["choice"]) == (point.method, point.budget, "auto", None, point.calibration, point.choice)), None)
        return bank, {t.name: per_example(t, predictions[t.name], SPLIT) for t in suite}, record if is_record_of(record, bank) else None

    records = []
    for h_point, p_point in zip(points[::2], points[1::2]):
        (h_bank, h_val, h_rec), (p_bank, p_val, p_rec) = scored(h_point), scored(p_point)
        sharing = layout_summary(h_bank)["sharing"]
        records.append({
            "budget": h_point.budget, "objective": "data-aware" if h_point.calibration else "data-free",
            "hydraopt_sharing_modules": sum(n for kind, n in sharing.items() if kind != "no sharing"),
            "hydraopt_val_score": sum(sum(v) / len(v) for v in h_val.values()) / len(h_val), "per_task_val_score": sum(sum(v) / len(v) for v in p_val.values()) / len(p_val),
            "val": difference(p_val, h_val),
            "test": difference(p_rec["examples"], h_rec["examples"]) if h_rec and p_rec else None,
            "hydraopt_val_examples": h_val, "per_task_val_examples": p_val,
        })
        print(json.dumps({k: v for k, v in records[-1].items() if not k.endswith("_examples")}), flush=True)
    meta = {"init": args.init, "split": SPLIT, "examples_per_task": len(suite[0].split(SPLIT)), "tasks": len(suite), "machine": platform.machine(), "torch": torch.__version__,
            "threads": args.threads, "seconds": time.perf_counter() - t0, "calibration": f"train examples 0-{CALIBRATION_PER_TASK - 1} per task (the frontier's)"}
    data = {"meta": meta, "records": records}
    write_record(out, data, markdown(data))


if __name__ == "__main__":
    main()
