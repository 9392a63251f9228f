"""Host benchmark of the exporters on SmolLM2-135M with the suite's adapters.

    flock -s /work/runs/cpu.lock nice -n 5 .venv/bin/python benchmarks/export_host.py [--examples 10] \
        [--plan NAME,...] [--work out/export_host] [--deadline HH:MM]

Banks: one-adapter-per-task (method ``none``) and HydraOpt at two storage budgets (0.5 and 0.3 of
the fp16 bytes). Every bank is exported with one slot signature (``--slots q_proj,v_proj:16``, see
SLOTS), so each runtime/quantisation has one program: the first export of it lowers the program
into a program cache kept in ``--work`` (empty at the start of a fresh work folder; ONNX quantised
programs are derived from the cached fp32 one), every later bank reuses it and writes data files
only. The ``-merged1`` exports fold one task's adapter into the weights (the "one program per task"
deployment: the bytes and decode-latency reference); they are never cached, so they always lower.
Exports run in PLAN order; each is kept in ``--work`` so an interrupted run resumes, measured with
``bench_host``, and the results are rewritten after each one, so a run cut short (``--deadline``)
still leaves valid, complete records for what it measured and names the exports it did not run.

Per export the records carry ``export_seconds`` and ``program_source`` (lowered, derived or cache)
of this run. The notes record the command, the start and end time, the 1-minute load average
sampled through the run and the other processes that used the CPU meanwhile: export times and
latencies here are measured on whatever the machine carried (a shared ``flock -s`` lock), not on an
exclusive machine; the exclusive-machine figures are ``export_reuse.json`` (export speed, first and
reused program) and ``slot_overhead_<runtime>.json`` / ``vs_optimum.json`` (decode latency side by side).

Writes benchmarks/results/export_host.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from common import ROOT, SUITE_ADAPTERS, RESULTS_DIR  # first: it puts this checkout on sys.path

from exporters.runtime import export_tokenizer
from hydraopt_mobile.app.bench import bench_host, peak_rss, task_prompts, write_reports
from exporters.export import bank_digest, export_bank
from exporters.manifest import Manifest
from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.suite.model import base_model_dir

ADAPTERS = SUITE_ADAPTERS / "shared-seed"
RESULTS = RESULTS_DIR / "export_host.json"
SLOTS = "q_proj,v_proj:16"  # one signature for every bank: the planner's ranks go up to 2r = 16
BANKS = {"per-task": ("none", None), "hydraopt-50": ("hydraopt", "0.5"), "hydraopt-30": ("hydraopt", "0.3")}
# (bank, format, quant, merged task?) in priority order. The first export of each format/quant lowers
# its program (ONNX fp32 about 0.5-1 min, a quantised ONNX program derived from it about 1 min,
# ExecuTorch XNNPACK 3-6 min on the 2 cores); the other banks of it reuse it (seconds). The recommended
# 4-bit recipes (README, benchmarks/results/quant_recipes*.md: ONNX int4-mixed, ExecuTorch
# 8da4w-mixed-noclip) come before the plain int4/8da4w ones, kept for comparison with earlier runs.
PLAN = [
    ("hydraopt-50", "onnx", "fp32", False),
    ("per-task", "onnx", "fp32", False),
    ("hydraopt-50", "onnx", "int4-mixed", False),
    ("per-task", "onnx", "int4-mixed", False),
    ("hydraopt-50", "executorch", "8da4w-mixed-noclip", False),
    ("per-task", "executorch", "8da4w-mixed-noclip", False),
    ("per-task", "onnx", "fp32", True),
    ("hydraopt-30", "onnx", "fp32", False),
    ("hydraopt-30", "onnx", "int4-mixed", False),
    ("hydraopt-30", "executorch", "8da4w-mixed-noclip", False),
    ("hydraopt-50", "onnx", "int8", False),
    ("per-task", "onnx", "int8", False),
    ("hydraopt-50", "onnx", "int4", False),
    ("per-task", "onnx", "int4", False),
    ("per-task", "executorch", "8da4w-mixed-noclip", True),
    ("hydraopt-50", "executorch", "8da4w", False),
    ("per-task", "executorch", "8da4w", False),
    ("hydraopt-30", "onnx", "int8", False),
    ("hydraopt-30", "onnx", "int4", False),
    ("per-task", "onnx", "int4-mixed", True),
    ("hydraopt-50", "executorch", "fp32", False),
    ("per-task", "executorch", "fp32", False),
    ("hydraopt-30", "executorch", "8da4w", False),
    ("hydraopt-30", "executorch", "fp32", False),
]


def export_name(bank: str, fmt: str, quant: str, merged: bool) -> str:
    return f"{fmt}-{quant}-{bank}" + ("-merged1" if merged else "")


class LoadMonitor:
    """Samples, every ``period`` s in a daemon thread, the 1-minute load average and the CPU time
    of every process outside this one's tree, so the report can say what shared the cores."""

    def __init__(self, period: float = 30.0):
        self.period, self.loads, self.cpu_s, self.names = period, [], {}, {}
        self._stop = threading.Event()
        self._start = self._cpu_times()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _ours() -> set[int]:
        me = psutil.Process()
        return {me.pid, *(c.pid for c in me.children(recursive=True))}

    def _cpu_times(self) -> dict[int, float]:
        ours, out = self._ours(), {}
        for p in psutil.process_iter(["pid", "cmdline", "name", "cpu_times"]):
            if p.info["pid"] in ours or p.info["cpu_times"] is None:
                continue
            out[p.info["pid"]] = p.info["cpu_times"].user + p.info["cpu_times"].system
            self.names[p.info["pid"]] = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:160]
        return out

    def _run(self) -> None:
        last = self._start
        while not self._stop.wait(self.period):
            self.loads.append(os.getloadavg()[0])
            now = self._cpu_times()
            for pid, t in now.items():  # a process first seen now started since the last sample: all its time counts
                self.cpu_s[pid] = self.cpu_s.get(pid, 0.0) + max(0.0, t - last.get(pid, 0.0))
            last = now

    def summary(self, wall_s: float) -> dict:
        """Load average quantiles and the processes outside this run that used >= 5 % of a core."""
        loads = sorted(self.loads) or [os.getloadavg()[0]]
        others = sorted(((t, pid) for pid, t in self.cpu_s.items() if t >= 0.05 * wall_s), reverse=True)
        return {
            "load_average_1min": {"min": round(loads[0], 2), "median": round(statistics.median(loads), 2),
                                  "max": round(loads[-1], 2), "samples": len(self.loads), "every_s": self.period},
            "cpus": os.cpu_count(),
            "other_processes": [{"cpu_cores_mean": round(t / wall_s, 2), "command": self.names.get(pid, "?")} for t, pid in others[:8]],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=Path, default=ADAPTERS)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "export_host",
                        help="export folders and the program cache (programs/); a new folder means every program is lowered once")
    parser.add_argument("--examples", type=int, default=10, help="test examples per task")
    parser.add_argument("--plan", default=None, help="comma-separated export names to run (default: all of PLAN)")
    parser.add_argument("--deadline", default=None, help="UTC HH:MM after which no new export is started")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON path (.md and .png beside it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, monitor = time.time(), LoadMonitor()

    adapter_set = load_adapter_folders(args.adapters)
    model_dir = base_model_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["HYDRAOPT_PROGRAM_CACHE"] = str((args.work / "programs").resolve())
    names = {export_name(*p) for p in PLAN}
    wanted = set(args.plan.split(",")) if args.plan else None
    if wanted and wanted - names:
        sys.exit(f"--plan: unknown export(s) {', '.join(sorted(wanted - names))}; known: {', '.join(export_name(*p) for p in PLAN)}")
    plan = [p for p in PLAN if wanted is None or export_name(*p) in wanted]

    banks = {}
    for name in dict.fromkeys(p[0] for p in plan):
        method, budget = BANKS[name]
        banks[name] = merge(adapter_set, MergeConfig(method=method, budget=Budget.parse(budget) if budget else None))

    notes = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32; not the bf16 release)",
        "adapters": f"{args.adapters.relative_to(ROOT) if args.adapters.is_relative_to(ROOT) else args.adapters} "
        f"({len(adapter_set.tasks)} tasks, LoRA r and targets as trained by the suite)",
        "bank_digests": {k: bank_digest(b) for k, b in banks.items()},
        "banks": {k: {"method": v[0], "budget": v[1], "payload_bytes": banks[k].payload_bytes(), "file_bytes": banks[k].total_file_bytes()}
                  for k, v in BANKS.items() if k in banks},
        "slots": f"every bank exported with --slots {SLOTS} (one program per runtime/quant; a bank's smaller ranks are "
        "zero-padded in the slots, its files keep their own ranks)",
        "programs": "cached in --work/programs, empty at the start of a new work folder: per runtime/quant the first export "
        "lowers (ONNX quantised: derived from the cached fp32 program), the others reuse it (program_source per record); "
        "-merged1 exports always lower",
        "threads": args.threads,
        "examples_per_task": args.examples,
        "switch_ms": "median of 21 switches to the task from another one, task files already loaded (set_task: ExecuTorch's "
        "set_slots method copying the decoded slots into mutable buffers; ONNX Runtime: the task's decoded slots as feeds)",
        "task_load_ms": "first load of the task in a freshly opened session: verify, read and decode its own files into the slots",
        "program_load_ms": "opening the resident program: what a 'separate program per task' deployment pays per switch",
        "peak_rss_mb": "peak RSS of a child process that only runs the export (includes Python + torch import, see rss_baseline_mb)",
        "score": "suite metric on the runtime's own greedy outputs (batch 1) on the first examples_per_task test examples of "
        "each task; score_pytorch: PyTorch fp32 reference, same adapter, same examples",
    }
    records, seconds = _previous(args.results, args.work)
    if records:
        notes["resumed"] = f"records of {len({r['export'] for r in records})} export(s) kept from an earlier run of this script on the same export folders"
    reference_scores: dict = {}
    not_run = []
    for bank_name, fmt, quant, merged in plan:
        name = export_name(bank_name, fmt, quant, merged)
        if args.deadline and time.strftime("%H:%M", time.gmtime()) >= args.deadline:
            not_run.append(name)
            continue
        folder = args.work / name
        bank = banks[bank_name]
        if not _holds(folder, bank):
            t0 = time.time()
            export_bank(bank, model_dir, fmt, quant, folder, overwrite=True, merged_task=bank.tasks[0] if merged else None,
                        slots=None if merged else SLOTS)
            seconds[name] = round(time.time() - t0, 1)
            records = [r for r in records if r["export"] != name]  # measured on the replaced export
            print(f"{name}: exported in {seconds[name]} s ({Manifest.read(folder).extra.get('program_source')})", flush=True)
        if any(r["export"] == name for r in records):
            continue  # measured by an earlier run on this very export (same export id)
        tasks = [bank.tasks[0]] if merged else None
        new = bench_host([folder], tasks=tasks, banks={str(folder): bank}, model_dir=model_dir,
                         n_examples=args.examples, threads=args.threads, reference_scores=reference_scores)
        extra = Manifest.read(folder).extra
        for r in new:
            r.update(export_seconds=seconds.get(name), program_source=extra.get("program_source"))
        records += new
        _write(records, notes, args, monitor, started, seconds, not_run, len(adapter_set.tasks), final=False)
        print(f"{name}: done", flush=True)
    _remeasure_rss(records, args.work, args.threads)
    _write(records, notes, args, monitor, started, seconds, not_run, len(adapter_set.tasks), final=True)


def _write(records: list[dict], notes: dict, args, monitor: LoadMonitor, started: float, seconds: dict, not_run: list[str],
           n_tasks: int, final: bool) -> None:
    """Rewrite the three result files with what is measured so far, and how the machine was loaded."""
    wall = time.time() - started
    notes["export_seconds"] = {r["export"]: seconds.get(r["export"]) for r in records}
    notes["run"] = {
        "finished_utc" if final else "last_update_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "wall_minutes": round(wall / 60, 1),
        **monitor.summary(wall),
        "why": "measured under a shared lock, with whatever else the machine ran (other_processes): export_seconds, "
        "program_load_ms, prefill and decode latencies are figures under that load. Exclusive-machine figures: "
        "export_reuse.json (first and reused export seconds, per phase), slot_overhead_<runtime>.json and vs_optimum.json "
        "(decode latency of each export against its merged reference, side by side in one process)",
    }
    if not_run:
        notes["not_run"] = {"exports": not_run, "why": f"--deadline {args.deadline} UTC passed before they started"}
    elif final:
        notes.pop("not_run", None)
    _naive(records, notes, n_tasks)
    _flag_earlier_adapters(records, notes)
    write_reports(records, args.results, notes)


def _remeasure_rss(records: list[dict], work: Path, threads: int) -> None:
    """Records measured before peak RSS was read from VmHWM get it from a separate child run."""
    for export in dict.fromkeys(r["export"] for r in records if not r.get("rss_source", "").startswith("VmHWM")):
        rows = [r for r in records if r["export"] == export]
        _, prompts, max_new = task_prompts(export_tokenizer(work / export), [r["task"] for r in rows], 1)
        rss = peak_rss(work / export, prompts, max_new, threads)
        for r in rows:
            r.update(rss, rss_source="VmHWM of a separate child: load, every task, one generation each")


def _holds(folder: Path, bank) -> bool:
    """True when ``folder`` is a complete export of this very bank (adapters may have been retrained)."""
    manifest = folder / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text())["extra"].get("bank_digest") == bank_digest(bank)


def _previous(results: Path, work: Path) -> tuple[list[dict], dict]:
    """Records of an earlier run whose export folders are still the ones measured (same export id),
    and the export times recorded for them."""
    if not results.is_file():
        return [], {}
    saved = json.loads(results.read_text())
    kept = []
    for r in saved["records"]:
        manifest = work / r["export"] / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text())["export_id"] == r.get("export_id"):
            kept.append(r)
    names = {r["export"] for r in kept}
    seconds = {k: v for k, v in saved["notes"].get("export_seconds", {}).items() if k in names}
    return kept, seconds


def _flag_earlier_adapters(records: list[dict], notes: dict) -> None:
    stale = sorted({r["export"] for r in records if r.get("bank_digest") not in notes["bank_digests"].values()})
    if stale:
        notes["measured_on_earlier_adapters"] = {
            "exports": stale,
            "why": "the suite retrained its adapters after these were measured. Bytes, latency and switch time do "
            "not depend on adapter values; their score and parity are against the PyTorch reference of the same "
            "earlier adapters (and the suite's test split of that time), so compare them only with each other",
        }


def _naive(records: list[dict], notes: dict, n_tasks: int) -> None:
    """The naive deployment: one fully merged program per task, T times the merged program's bytes."""
    naive = {}
    for r in records:
        if "+merged:" in r["method"]:
            naive[f"{r['runtime']}/{r['quant']}"] = {"bytes_per_task_program": r["bytes_total"], "bytes_all_tasks": n_tasks * r["bytes_total"],
                                                     "tasks": n_tasks}
    notes["naive_deployment"] = naive


if __name__ == "__main__":
    main()
