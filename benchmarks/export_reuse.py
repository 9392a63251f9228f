"""Program reuse, export phases and cold task switches on SmolLM2-135M with the suite's adapters.

    flock -x /work/runs/cpu.lock .venv/bin/python benchmarks/export_reuse.py [--plan onnx-fp32,executorch-8da4w]

Two HydraOpt banks of the suite's adapters (storage budgets 0.5 and 0.3 of the fp16 bytes) share
one slot signature (``--slots q_proj,v_proj:16``: the planner picks ranks up to 2r = 16). For each
runtime/quant of the plan, with an empty program cache: bank A exported (``first``: the program is
lowered), then bank B (``reused``: the cached program is hard-linked, only data files are written),
then bank B again with the cache off (``fresh``, ONNX only unless ``--fresh-executorch``: a full
export, whose program must hash the same and whose runtime outputs must equal the reused export's).
Per export: ``export_seconds``, ``program_sha256``, the lowering phases' seconds, the cold task
switch (``task_load_ms``: verify, read and decode the task's own file, write every slot; median of
5 per task, then median over tasks), and for the reused export the update size for one more task:
the files that change (its own file and the two manifests) against the program and one fp16 adapter.

Writes benchmarks/results/export_reuse.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, SUITE_ADAPTERS, RESULTS_DIR, machine_probe  # first: it puts this checkout on sys.path

from exporters.export import export_bank
from exporters.manifest import Manifest
from exporters.runtime import greedy, open_export
from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.suite.model import base_model_dir

ADAPTERS = SUITE_ADAPTERS / "shared-seed"
RESULTS = RESULTS_DIR / "export_reuse.json"
SLOTS = "q_proj,v_proj:16"
BUDGETS = {"A": "0.5", "B": "0.3"}
PROMPT = [1, 9690, 314, 253, 5356, 30, 2]  # any ids: outputs are compared between exports, not scored


def cold_switch_ms(folder: Path, samples: int = 5) -> tuple[float, dict[str, float]]:
    """The first load of a freshly opened session (its file's read plan not yet made, its slots
    decoded into fresh memory), and per task the median over ``samples`` of load_task + set_task
    from another active task, the task not loaded (``Session.unload``: an app keeping a bounded
    number of tasks loaded, so the load decodes into memory the session already has)."""
    session = open_export(folder)
    t0 = time.perf_counter()
    session.load_task(session.tasks[0])
    session.set_task(session.tasks[0])
    first, out = (time.perf_counter() - t0) * 1e3, {}
    for i, task in enumerate(session.tasks):
        other = session.tasks[i - 1]
        times = []
        for _ in range(samples):
            session.set_task(other)
            session.unload(task)
            t0 = time.perf_counter()
            session.load_task(task)
            session.set_task(task)
            times.append((time.perf_counter() - t0) * 1e3)
        out[task] = statistics.median(times)
    return first, out


def outputs(folder: Path, tasks: list[str]) -> list[np.ndarray]:
    session = open_export(folder)
    rows = []
    for task in tasks:
        session.set_task(task)
        rows.append(greedy(session, PROMPT, 4, keep_logits=True).token_logits())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default="onnx-fp32,executorch-8da4w")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "export_reuse")
    parser.add_argument("--fresh-executorch", action="store_true", help="also a cache-less export of bank B on ExecuTorch (minutes)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    probe = machine_probe()
    torch.set_num_threads(1)
    adapter_set = load_adapter_folders(ADAPTERS)
    banks = {k: merge(adapter_set, MergeConfig(method="hydraopt", budget=Budget.parse(b))) for k, b in BUDGETS.items()}
    model_dir = base_model_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    checks: dict = {}
    for item in args.plan.split(","):
        fmt, quant = item.split("-")
        os.environ["HYDRAOPT_PROGRAM_CACHE"] = tempfile.mkdtemp(prefix="programs-", dir=args.work)  # empty: the first export lowers
        runs = [("first", "A", True), ("reused", "B", True)]
        if fmt == "onnx" or args.fresh_executorch:
            runs.append(("fresh", "B", False))
        folders = {}
        for kind, bank_name, cache in runs:
            folder = args.work / f"{item}-{kind}"
            t0 = time.perf_counter()
            export_bank(banks[bank_name], model_dir, fmt, quant, folder, overwrite=True, slots=SLOTS, use_cache=cache)
            seconds = time.perf_counter() - t0
            manifest = Manifest.read(folder)
            _, switch = cold_switch_ms(folder)
            record = {
                "runtime": manifest.runtime, "quant": quant, "kind": kind, "bank": f"hydraopt@{BUDGETS[bank_name]}",
                "export_seconds": round(seconds, 2), "program_sha256": manifest.program["sha256"],
                "program_source": manifest.extra["program_source"],
                "phases_s": {k: round(v, 2) for k, v in manifest.extra["phases_s"].items()},
                "program_bytes": manifest.bytes_of("program"), "shared_bytes": manifest.bytes_of("shared"),
                "task_bytes_total": manifest.bytes_of("task"), "bank_file_bytes": banks[bank_name].total_file_bytes(),
                "task_load_ms_median": round(statistics.median(switch.values()), 3),
                "task_load_ms": {t: round(v, 3) for t, v in switch.items()},
            }
            if kind == "reused":
                task = max(manifest.tasks, key=manifest.task_bytes)
                changed = manifest.task_bytes(task) + (folder / "manifest.json").stat().st_size + (folder / "bank" / "manifest.json").stat().st_size
                record["update_one_task"] = {
                    "task": task, "files_that_change_bytes": changed, "task_file_bytes": manifest.task_bytes(task),
                    "program_bytes": manifest.bytes_of("program"),
                    "fp16_adapter_bytes": round(banks[bank_name].reference_file_bytes / len(manifest.tasks)),
                }
            records.append(record)
            folders[kind] = folder
            print(json.dumps({k: record[k] for k in ("runtime", "quant", "kind", "export_seconds", "task_load_ms_median")}), flush=True)
        if "fresh" in folders:
            tasks = Manifest.read(folders["reused"]).tasks
            same = all(np.array_equal(a, b) for a, b in zip(outputs(folders["reused"], tasks), outputs(folders["fresh"], tasks)))
            checks[item] = {"reused_outputs_equal_fresh_export": same,
                            "same_program_sha256": records[-1]["program_sha256"] == records[-2]["program_sha256"]}
    notes = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32)", "slots": SLOTS, "threads": 1,
        "machine": f"{platform.machine()}, 2 cores, run under flock -x (no other heavy job)", "machine_probe": probe,
        "task_load_ms": "cold switch: verify (size, SHA-256) + read + numpy-decode the task's own file into every slot, then "
        "set_task (ExecuTorch: set_slots method; ONNX Runtime: the slots made ONNX Runtime values at load, bound on the switch); median of 5 per task, then over tasks",
        "update_one_task": "the files a phone downloads for one more task whose factors are its own (hydraopt add's per-task "
        "case): its file and the two manifests; the program and the shared file stay byte-identical",
        "checks": checks,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"notes": notes, "records": records}, indent=1))
    lines = ["# Program reuse and export phases (SmolLM2-135M)", "",
             "| runtime | quant | kind | export s | phases s | program sha256 | task_load_ms median |", "|---|---|---|---|---|---|---|"]
    for r in records:
        phases = ", ".join(f"{k} {v}" for k, v in r["phases_s"].items())
        lines.append(f"| {r['runtime']} | {r['quant']} | {r['kind']} | {r['export_seconds']} | {phases} | {r['program_sha256'][:12]} | {r['task_load_ms_median']} |")
    lines += ["", "Update for one more task (files that change) vs program vs one fp16 adapter:", ""]
    for r in records:
        if "update_one_task" in r:
            u = r["update_one_task"]
            lines.append(f"- {r['runtime']} {r['quant']}: {u['files_that_change_bytes']:,} bytes vs program {u['program_bytes']:,} vs fp16 adapter {u['fp16_adapter_bytes']:,}")
    lines += ["", f"Checks: {json.dumps(checks)}", ""]
    args.results.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
