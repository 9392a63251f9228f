"""Cold task switch on existing exports: per task, the median of 5 (verify, read and decode the
task's own file, activate), then the median over tasks; the same measurement as export_reuse.py's
``task_load_ms``, without re-exporting. ``first_load_ms`` is the first load after the export is
opened, which also makes the file's read plan (later tasks of the same layout reuse it).

    python benchmarks/cold_switch.py out/export_reuse/onnx-fp32-reused out/export_reuse/executorch-8da4w-reused [EXPORT...]

Writes benchmarks/results/cold_switch.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

from common import RESULTS_DIR, machine_probe  # first: it puts this checkout on sys.path

from benchmarks.export_reuse import cold_switch_ms
from exporters.manifest import Manifest
from hydraopt_mobile.app.records import markdown_table, write_record

RESULTS = RESULTS_DIR / "cold_switch.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("exports", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    records = []
    for folder in args.exports:
        m = Manifest.read(folder)
        first, per_task = cold_switch_ms(folder)
        shared = m.find("shared")
        records.append({"export": folder.name, "runtime": m.runtime, "quant": m.quant, "method": m.method, "tasks": len(per_task),
                        "bytes_task_median": statistics.median(m.task_file(t).bytes for t in m.tasks if m.task_file(t)),
                        "bytes_shared": shared.bytes if shared else 0,
                        "first_load_ms": round(first, 3),
                        "task_load_ms_median": round(statistics.median(per_task.values()), 3),
                        "task_load_ms": {t: round(v, 3) for t, v in per_task.items()}})
        print(records[-1]["export"], records[-1]["task_load_ms_median"], flush=True)
    meta = {"machine": platform.machine(), "machine_probe": machine_probe(), "threads": 1, "command": "python benchmarks/cold_switch.py " + " ".join(sys.argv[1:]),
            "task_load_ms": "load_task + set_task on a task not loaded before: read its own file once, verify (size, SHA-256 of the "
                            "bytes read), numpy-decode it into every slot, activate; median of 5 per task, then median over tasks",
            "first_load_ms": "the first load after opening the export: the same, plus parsing and checking the file's header "
                             "into a read plan (one per distinct header; tasks of one layout share it)"}
    table = markdown_table(["export", "runtime", "quant", "method", "tasks", "task file bytes (median)", "shared bytes",
                            "first load ms", "task_load_ms median"],
                           [[r["export"], r["runtime"], r["quant"], r["method"], r["tasks"], r["bytes_task_median"], r["bytes_shared"],
                             r["first_load_ms"], r["task_load_ms_median"]] for r in records])
    write_record(args.out, {"meta": meta, "records": records}, "\n".join(["# Cold task switch on existing exports", "", *table, ""]))


if __name__ == "__main__":
    main()
