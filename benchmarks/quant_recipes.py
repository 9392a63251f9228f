"""Suite score vs program bytes of a runtime's ``--quant`` recipes, for one-adapter-per-task and HydraOpt.

    python benchmarks/quant_recipes.py [--examples 24] [--recipes fp32,int8,int4,...] [--methods none,hydraopt[,hydraopt-fp16]]
    python benchmarks/quant_recipes.py --runtime executorch --slots q_proj,v_proj:16 --recipes fp32,8da4w-mixed,8da4w

Banks: the suite's adapters (shared-seed) as one adapter per task (method ``none``), HydraOpt at
1/T of the fp16 file bytes and, with ``--methods ...,hydraopt-fp16``, HydraOpt in fp16 at 0.52. Each (bank, recipe) is exported with ``export_bank`` (the quantised
programs are derived from the cached fp32 program of the same signature) into ``--work``, then
decoded greedily on the runtime (1 thread) on the first ``--examples`` test examples of every
task. ``--slots``: one program signature for both banks (an ExecuTorch lowering takes 20-40
minutes, so the second bank reuses the cached program). Per-example scores are kept in
``--work/scores/`` after every task, so an interrupted run resumes; each
recipe's drop vs fp32 of the same bank has a 95 % paired bootstrap interval
(``hydraopt_mobile.suite.metrics.paired_drop``). Scores are not timings: they may run under load.

``slot_overhead_pct`` is a timing (decode with switchable slots against the same export with the
task merged in, side by side under the exclusive CPU lock): left null here, written into the record
by ``benchmarks/slot_overhead.py --update-recipes``.

Writes benchmarks/results/quant_recipes.{json,md,png} (ONNX) or quant_recipes_executorch.{json,md,png}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from common import ROOT, SUITE_ADAPTERS, RESULTS_DIR  # first: it puts this checkout on sys.path

from exporters.backend import Session
from exporters.export import bank_digest, export_bank
from exporters.manifest import Manifest
from exporters.slots import bank_signature, parse_slot_spec
from exporters.et_recipes import RECIPES as ET_RECIPES
from exporters.onnx_recipes import RECIPES as ONNX_RECIPES
from exporters.runtime import greedy, open_export
from hydraopt_mobile.adapters import load_adapter_folders
from exporters.runtime import export_tokenizer
from hydraopt_mobile.app.bench import task_prompts
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.atomic import write_text_atomic
from hydraopt_mobile.base_model import load_causal_lm
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.formats import NumberFormat
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.plotting import figure
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.suite.metrics import paired_drop, per_example
from hydraopt_mobile.suite.model import base_model_dir

ADAPTERS = SUITE_ADAPTERS / "shared-seed"
RUNTIMES = {  # --runtime -> (recipes, results, the runtime's name in records and titles, program file)
    "onnx": (ONNX_RECIPES, RESULTS_DIR / "quant_recipes.json", "ONNX Runtime", "model.onnx"),
    "executorch": (ET_RECIPES, RESULTS_DIR / "quant_recipes_executorch.json", "ExecuTorch (XNNPACK)", "model.pte"),
}
TARGET_4BIT = (0.90, 0.40)  # >= 90 % of the fp32 score at <= 40 % of the fp32 program's bytes
TARGET_8BIT = 3.0  # relative drop (%) at most


FP16_ONLY = 0.52  # the frontier's fp16-only HydraOpt point (issue 15's table: "fp16-only 0.52 and 1/T")
BANKS = {"none": "one adapter per task (fp16 factors)", "hydraopt": "HydraOpt at 1/T of the fp16 file bytes",
         "hydraopt-fp16": f"HydraOpt at {FP16_ONLY} of the fp16 file bytes, every factor fp16"}  # what suite_banks() holds


def suite_banks() -> dict[str, MergedBank]:
    """The banks a recipe can be measured on: the suite's shared-seed adapters as one adapter per task
    (``none``), HydraOpt at 1/T of the fp16 file bytes (``hydraopt``) and HydraOpt in fp16 only at
    0.52 (``hydraopt-fp16``: every factor fp16, so its saving is the planner's ranks, not a number format)."""
    adapter_set = load_adapter_folders(ADAPTERS)
    budget = Budget(fraction=round(1 / len(adapter_set.tasks), 4))
    return {
        "none": merge(adapter_set, MergeConfig(method="none")),
        "hydraopt": merge(adapter_set, MergeConfig(method="hydraopt", budget=budget)),
        "hydraopt-fp16": merge(adapter_set, MergeConfig(method="hydraopt", fmt=NumberFormat.parse("fp16"), budget=Budget(fraction=FP16_ONLY))),
    }


def score_export(folder: Path, n_examples: int, checkpoint: Path, open_session: Callable[[], Session]) -> dict[str, dict]:
    """task -> {"texts", "per_example"}: greedy answers of ``open_session()`` (on ``folder``'s export)
    on the first test examples; each finished task is written to ``checkpoint`` and not decoded again
    by a rerun (which opens no session when every task is there)."""
    tokenizer = export_tokenizer(folder)
    names = Manifest.read(folder).tasks
    specs, prompts, max_new = task_prompts(tokenizer, names, n_examples)
    out = json.loads(checkpoint.read_text()) if checkpoint.is_file() else {}
    session = open_session() if any(task not in out for task in names) else None
    for task in names:
        if task in out:
            continue
        session.load_task(task)
        session.set_task(task)
        texts = [tokenizer.decode(greedy(session, ids, max_new[task]).tokens, skip_special_tokens=True).strip() for ids in prompts[task]]
        out[task] = {"texts": texts, "per_example": per_example(specs[task], texts, "test")}
        write_text_atomic(checkpoint, json.dumps(out, indent=1))
    return out


def exported(bank, model_dir: Path, runtime: str, quant: str, folder: Path, slots: str | None, merged_task: str | None = None) -> float | None:
    """``folder`` holds the export of ``bank`` at ``quant`` (with ``merged_task`` folded in, if given),
    made now unless it is there already; seconds taken (None: reused)."""
    method = bank.method if merged_task is None else f"{bank.method}+merged:{merged_task}"
    if (folder / "manifest.json").is_file():
        m = Manifest.read(folder)
        if m.quant == quant and m.method == method and m.extra.get("bank_digest") == bank_digest(bank) and m.signature == wanted_signature(bank, model_dir, slots, merged_task):
            return None
    t0 = time.time()
    export_bank(bank, model_dir, runtime, quant, folder, overwrite=True, slots=None if merged_task else slots, merged_task=merged_task)
    return round(time.time() - t0, 1)


def wanted_signature(bank: MergedBank, model_dir: Path, slots: str | None, merged_task: str | None) -> dict[str, int]:
    """The slot signature :func:`exported` asks for: none with a task merged in, else the ``--slots``
    spec's or the bank's own (an export in ``folder`` with another signature is made again, not reused)."""
    if merged_task is not None:
        return {}
    return bank_signature(bank) if slots is None else _spec_signature(Path(model_dir), slots)


@functools.lru_cache(maxsize=8)
def _spec_signature(model_dir: Path, slots: str) -> dict[str, int]:
    return parse_slot_spec(slots, load_causal_lm(model_dir))


def mean_score(per_task: dict[str, dict]) -> float:
    return sum(sum(v["per_example"]) / len(v["per_example"]) for v in per_task.values()) / len(per_task)


def _records(scores: dict, work: Path, notes: dict, recipes: dict) -> list[dict]:
    records = []
    for (method, quant), per_task in scores.items():
        fp32 = scores.get((method, "fp32"))
        folder = work / f"{method}-{quant}"
        m = Manifest.read(folder)
        fp32_bytes = Manifest.read(work / f"{method}-fp32").bytes_of("program") if fp32 else None
        drop = paired_drop({t: v["per_example"] for t, v in fp32.items()}, {t: v["per_example"] for t, v in per_task.items()}) if fp32 else None
        program_bytes = m.bytes_of("program")
        rec = {
            "runtime": m.runtime, "quant": quant, "bits": recipes[quant].bits, "method": method,
            "description": recipes[quant].description,
            "n_tasks": len(per_task), "n_examples": len(next(iter(per_task.values()))["per_example"]),
            "score": mean_score(per_task), "fp32_score": mean_score(fp32) if fp32 else None,
            "program_bytes": program_bytes, "fp32_program_bytes": fp32_bytes,
            "bytes_ratio": program_bytes / fp32_bytes if fp32_bytes else None,
            "score_ratio": mean_score(per_task) / mean_score(fp32) if fp32 else None,
            "drop_points": drop["drop_points"] if drop else None,
            "drop_points_ci95": drop["drop_points_ci95"] if drop else None,
            "rel_drop_pct": drop["rel_drop_pct"] if drop else None,
            "rel_drop_pct_ci95": drop["rel_drop_pct_ci95"] if drop else None,
            "slot_overhead_pct": None,
            "per_task": {t: sum(v["per_example"]) / len(v["per_example"]) for t, v in per_task.items()},
            "export_seconds": notes["export_seconds"].get(f"{method}-{quant}"),
        }
        if fp32 and rec["bits"] in (4, 8):  # on the point estimate, and on the whole 95 % interval
            limit = 100 * (1 - TARGET_4BIT[0]) if rec["bits"] == 4 else TARGET_8BIT
            small = rec["bytes_ratio"] <= TARGET_4BIT[1] if rec["bits"] == 4 else True
            rec["meets_target"] = small and rec["rel_drop_pct"] <= limit
            rec["meets_target_ci"] = small and rec["rel_drop_pct_ci95"][1] <= limit
        records.append(rec)
    return records


def _coverage(scores: dict, args: argparse.Namespace) -> str:
    """What this record holds: the (recipe, bank) rows scored, of those asked for, on which examples."""
    asked = [(m, q) for q in args.recipes.split(",") for m in args.methods.split(",")]
    done = [f"{m}-{q}" for m, q in asked if (m, q) in scores]
    missing = [f"{m}-{q}" for m, q in asked if (m, q) not in scores]
    n_tasks = len(next(iter(scores.values())))
    return (f"rows {', '.join(done)}; all on the first {args.examples} test examples of each of {n_tasks} tasks, from one "
            f"scores folder ({args.work.name}/scores, one example set)" + (f"; asked for but not scored: {', '.join(missing)}" if missing else ""))


def markdown(records: list[dict], notes: dict, title: str) -> str:
    lines = [f"# {title} quantisation recipes: suite score vs program bytes", ""]
    lines += [f"- **{k}**: {v}" for k, v in notes.items() if k != "export_seconds"]
    lines += ["", "Targets: a 4-bit recipe >= 90 % of fp32's score at <= 40 % of fp32's program bytes; 8-bit within 3 % (relative).", ""]
    rows = [
        [r["method"], r["quant"], r["bits"], f"{r['program_bytes'] / 1e6:.1f}", r["bytes_ratio"], r["score"], r["fp32_score"],
         None if r["drop_points"] is None else f"{r['drop_points']:+.2f} [{r['drop_points_ci95'][0]:+.2f}, {r['drop_points_ci95'][1]:+.2f}]",
         None if r["rel_drop_pct"] is None else f"{r['rel_drop_pct']:+.1f} [{r['rel_drop_pct_ci95'][0]:+.1f}, {r['rel_drop_pct_ci95'][1]:+.1f}]",
         {True: "yes", False: "no"}.get(r.get("meets_target")), {True: "yes", False: "no"}.get(r.get("meets_target_ci")),
         None if r.get("slot_overhead_pct") is None else f"{r['slot_overhead_pct']:+.1f}", r["description"]]
        for r in sorted(records, key=lambda r: (r["method"], -r["program_bytes"]))
    ]
    lines += markdown_table(
        ["method", "quant", "bits", "MB program", "bytes / fp32", "score", "fp32 score", "drop pts [95 % CI]", "drop % [95 % CI]", "target met", "met by the whole CI", "slot overhead %", "recipe"],
        rows, "lllrrrrrrllrl",
    )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], png: Path, title: str, program_file: str) -> None:
    fp32 = [r for r in records if r["quant"] == "fp32"]
    with figure(png, figsize=(8, 5)) as (_, ax):
        for method, marker in (("none", "o"), ("hydraopt", "s"), ("hydraopt-fp16", "^")):
            rs = [r for r in records if r["method"] == method]
            ax.scatter([r["program_bytes"] / 1e6 for r in rs], [r["score"] for r in rs], marker=marker, label=f"{title}, method {method}")
            for r in rs:
                ax.annotate(r["quant"], (r["program_bytes"] / 1e6, r["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if fp32:
            ax.axvline(TARGET_4BIT[1] * fp32[0]["program_bytes"] / 1e6, ls=":", c="grey", label="40 % of fp32 bytes")
            ax.axhline(TARGET_4BIT[0] * fp32[0]["score"], ls="--", c="grey", label=f"90 % of fp32 score ({fp32[0]['method']})")
        ax.set_xlabel(f"program bytes (MB, {program_file})")
        ax.set_ylabel("suite score (mean over tasks)")
        ax.set_title(f"{title} --quant recipes on SmolLM2-135M (Q4_1 GGUF base)")
        ax.legend(fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", choices=sorted(RUNTIMES), default="onnx")
    parser.add_argument("--slots", default=None, help="--slots spec of the program (default: each bank's own signature)")
    parser.add_argument("--examples", type=int, default=24, help="test examples per task")
    parser.add_argument("--recipes", default="fp32,int8,int4", help="comma-separated --quant names, fp32 first")
    parser.add_argument("--methods", default="none,hydraopt")
    parser.add_argument("--work", type=Path, default=None, help="default: out/quant_recipes (ONNX), out/quant_recipes_executorch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=None, help="default: the runtime's record (module docstring)")
    parser.add_argument("--report-only", action="store_true", help="write the results from the scores already in --work")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipes, results, title, program_file = RUNTIMES[args.runtime]
    args.work = args.work or ROOT / "out" / ("quant_recipes" if args.runtime == "onnx" else f"quant_recipes_{args.runtime}")
    args.results = args.results or results

    banks = suite_banks()
    model_dir = base_model_dir()
    (args.work / "scores").mkdir(parents=True, exist_ok=True)
    notes_path = args.work / "notes.json"
    notes = json.loads(notes_path.read_text()) if notes_path.is_file() else {"export_seconds": {}}
    notes.update({
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32: linears Q4_1, embedding/tied head Q8_0)",
        "banks": {**BANKS, "hydraopt": f"HydraOpt at 1/T = {Budget(fraction=round(1 / len(banks['none'].tasks), 4)).label()} of the fp16 file bytes"},
        "bank_digests": {k: bank_digest(b) for k, b in banks.items()},
        "examples_per_task": args.examples,
        "decoding": f"greedy on {title}, {args.threads} thread(s), batch 1; {platform.machine()}, 2 shared cores",
        "slots": args.slots or "each bank's own signature",
        "drop": "fp32 score minus recipe score on the same examples, 95 % paired bootstrap over examples within tasks (paired_drop)",
        "program_bytes": f"file bytes of {program_file} (the resident program; the bank's files are the same for every recipe)",
        "slot_overhead_pct": "null here: a timing that needs the exclusive CPU lock and a merged-task export per recipe, "
        "which this script does not take (it runs under the shared lock beside other jobs); "
        "benchmarks/slot_overhead.py --update-recipes fills it",
        "export_seconds_are": "wall-clock seconds of each export under the shared lock, other jobs on the same 2 cores "
        "(load_average_1m: the 1-minute load average when each export / scoring step ended): not a timing claim",
    })
    notes.setdefault("load_average_1m", {})
    scores = {}
    for quant in args.recipes.split(","):
        for method in args.methods.split(","):
            path = args.work / "scores" / f"{method}-{quant}-{args.examples}.json"
            if not path.is_file() and args.report_only:
                continue
            if not path.is_file():
                folder = args.work / f"{method}-{quant}"
                took = exported(banks[method], model_dir, args.runtime, quant, folder, args.slots)
                if took is not None:
                    notes["export_seconds"][f"{method}-{quant}"] = took
                    notes["load_average_1m"][f"export {method}-{quant}"] = round(os.getloadavg()[0], 2)
                    write_text_atomic(notes_path, json.dumps(notes, indent=1))
                t0 = time.time()
                checkpoint = args.work / "scores" / f"{method}-{quant}-{args.examples}.partial.json"
                result = score_export(folder, args.examples, checkpoint, lambda: open_export(folder, args.threads))
                write_text_atomic(path, json.dumps(result, indent=1))
                notes["load_average_1m"][f"score {method}-{quant}"] = round(os.getloadavg()[0], 2)
                write_text_atomic(notes_path, json.dumps(notes, indent=1))
                print(f"{method}-{quant}: scored in {time.time() - t0:.0f} s, mean {mean_score(result):.2f}", flush=True)
            scores[(method, quant)] = json.loads(path.read_text())
            notes["coverage"] = _coverage(scores, args)
            records = _records(scores, args.work, notes, recipes)
            write_record(args.results, {"notes": notes, "records": records}, markdown(records, notes, title),
                         lambda png: plot(records, png, title, program_file))


if __name__ == "__main__":
    main()
