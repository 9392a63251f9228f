"""The real model's exports on ``arm64-cpu`` (the aarch64 builds of ONNX Runtime and ExecuTorch
under qemu-aarch64, emulated Cortex-A76): every task of each export, teacher-forced by default
(each test example's reference answer scored in one pass: exact when every answer token is the
argmax), against the same
runner on the host's build of the export's runtime (ONNX Runtime or ExecuTorch). HydraOpt's drop
against one-adapter-per-task is computed on the target's outputs and on the host's, on the same
examples, with 95 % paired bootstrap intervals.

    python benchmarks/device_arm64.py EXPORT_HYDRAOPT EXPORT_NONE [--examples 4] [--generated] [--jobs 2]

``--jobs 2`` runs the exports in parallel processes (one emulated runner each, one thread each), so
two exports take about the wall time of one on a two-core host. Each export runs ``--chunk`` tasks
per runner request, in round-robin order over the applications, checkpointed under
``--checkpoints`` (a rerun resumes), and starts no request after ``--minutes`` (the issue's "as many
examples as fit in 60 minutes per export"); the record says which tasks were covered.

Run it under ``flock -s /work/runs/cpu.lock nice -n 5`` on a shared machine; emulated latencies
depend on the host's load (recorded as ``host_load_avg_1min`` per export) and are never a phone's.
Writes benchmarks/results/device_arm64-cpu.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import zip_longest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporters.manifest import Manifest  # noqa: E402
from hydraopt_mobile.app.targets_bench import bench_target, notes, write_reports  # noqa: E402
from hydraopt_mobile.atomic import write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "device_arm64-cpu.json"


RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "executorch": "ExecuTorch"}


def task_order(tasks: list[str]) -> list[str]:
    """Round robin over the applications (``country-de`` -> ``country``), so that a run cut short
    still covers every application."""
    by_app: dict[str, list[str]] = {}
    for t in tasks:
        by_app.setdefault(t.split("-")[0], []).append(t)
    return [t for row in zip_longest(*by_app.values()) for t in row if t is not None]


def run_export(export: Path, tasks: list[str] | None, examples: int, teacher_forced: bool, chunk: int,
               minutes: float, checkpoints: Path) -> tuple[dict, list[dict]]:
    """One export on the target, ``chunk`` tasks per runner request (the first request also switches
    back to its first task and checks the outputs are bit-identical). Each request's records are kept
    in ``checkpoints`` (a rerun resumes there); no request starts after ``minutes``."""
    m = Manifest.read(export)
    names = task_order([t for t in m.tasks if tasks is None or t in tasks])
    folder = checkpoints / f"{export.name}-{m.export_id}-{examples}ex-{'tf' if teacher_forced else 'gen'}"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load = os.getloadavg()
    records: list[dict] = []
    for i in range(0, len(names), chunk):
        part = names[i:i + chunk]
        saved = folder / f"{'+'.join(part)}.json"
        if not saved.is_file():
            if (time.perf_counter() - t0) / 60 > minutes:
                break
            rs = bench_target("arm64-cpu", export, part, examples, threads=1, teacher_forced=teacher_forced, switch_back=i == 0)
            write_text_atomic(saved, json.dumps(rs))
            print(export.name, [(r["task"], r["score"], r["tokens_identical"], r["max_logit_err"]) for r in rs], flush=True)
        records += json.loads(saved.read_text())
    summary = {"runtime": m.runtime, "quant": m.quant, "method": m.method, "wall_s": round(time.perf_counter() - t0, 1),
               "tasks_covered": len(records), "tasks_in_export": len(names), "chunk": chunk, "minutes_limit": minutes,
               "host_load_avg_before": [round(x, 2) for x in load],
               "host_load_avg_after": [round(x, 2) for x in os.getloadavg()]}
    return summary, records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("exports", type=Path, nargs="+")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--task", action="append", dest="tasks")
    ap.add_argument("--generated", action="store_true", help="greedy generation instead of teacher-forced scoring")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", action="append", default=[], help="a line for the notes (where the exports come from, coverage)")
    ap.add_argument("--jobs", type=int, default=1, help="exports run in parallel (one process each)")
    ap.add_argument("--chunk", type=int, default=2, help="tasks per runner request (each request is checkpointed)")
    ap.add_argument("--minutes", type=float, default=60.0, help="start no request after this many minutes per export")
    ap.add_argument("--checkpoints", type=Path, default=ROOT / "out" / "device_arm64")
    args = ap.parse_args()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = [pool.submit(run_export, e, args.tasks, args.examples, not args.generated, args.chunk, args.minutes, args.checkpoints)
                for e in args.exports]
        results = [r.result() for r in runs]
    records, per_export = [], {}
    for export, (summary, rs) in zip(args.exports, results):
        per_export[export.name] = summary
        records += rs
    info = notes(records)
    info["command"] = "python benchmarks/device_arm64.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    info["exports"] = per_export
    info["notes"] = args.note
    runtimes = sorted({r["runtime"] for r in per_export.values()})
    info["host_reference"] = f"the same runner on the host's {' and '.join(RUNTIME_NAMES.get(r, r) for r in runtimes)} (x86_64), same export, same examples; not PyTorch"
    write_reports(records, args.out, info)


if __name__ == "__main__":
    main()
