"""Host benchmark of the exporters on SmolLM2-135M with the suite's adapters.

    .venv/bin/python benchmarks/export_host.py [--examples 10] [--plan onnx-fp32,...]

Banks: one-adapter-per-task (method ``none``) and HydraOpt at two storage budgets. Exports (in
this order, each kept in --work so an interrupted run resumes): see PLAN. Every finished export
is measured with ``bench_host`` and the results are rewritten after each one, so a run cut short
still leaves valid, complete records for what it measured.

Writes benchmarks/results/export_host.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from common import ROOT, SUITE_ADAPTERS, RESULTS_DIR  # first: it puts this checkout on sys.path

from hydraopt_mobile.app.bench import bench_host, export_tokenizer, peak_rss, task_prompts, write_reports
from exporters.export import bank_digest, export_bank
from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.suite.model import base_model_dir

ADAPTERS = SUITE_ADAPTERS / "shared-seed"
RESULTS = RESULTS_DIR / "export_host.json"
BANKS = {"per-task": ("none", None), "hydraopt-50": ("hydraopt", "0.5"), "hydraopt-30": ("hydraopt", "0.3")}
# (bank, format, quant, merged task?) in priority order: ONNX first (minutes), then ExecuTorch (XNNPACK
# lowering of the real model takes 5-8 min per export on 2 cores).
PLAN = [
    ("hydraopt-50", "onnx", "fp32", False),
    ("per-task", "onnx", "fp32", False),
    ("per-task", "onnx", "fp32", True),
    ("per-task", "executorch", "8da4w", True),
    ("hydraopt-50", "executorch", "8da4w", False),
    ("hydraopt-50", "onnx", "int4", False),
    ("hydraopt-30", "onnx", "fp32", False),
    ("per-task", "onnx", "int4", True),
    ("per-task", "onnx", "int4", False),
    ("per-task", "onnx", "int8", True),
    ("hydraopt-50", "onnx", "int8", False),
    ("per-task", "onnx", "int8", False),
    ("hydraopt-30", "onnx", "int4", False),
    ("hydraopt-30", "onnx", "int8", False),
    ("per-task", "executorch", "8da4w", False),
    ("hydraopt-30", "executorch", "8da4w", False),
    ("hydraopt-50", "executorch", "fp32", False),
    ("per-task", "executorch", "fp32", False),
    ("hydraopt-30", "executorch", "fp32", False),
    ("per-task", "executorch", "fp32", True),
]


def export_name(bank: str, fmt: str, quant: str, merged: bool) -> str:
    return f"{fmt}-{quant}-{bank}" + ("-merged1" if merged else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=Path, default=ADAPTERS)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "export_host")
    parser.add_argument("--examples", type=int, default=10, help="test examples per task")
    parser.add_argument("--plan", default=None, help="comma-separated export names to run (default: all of PLAN)")
    parser.add_argument("--deadline", default=None, help="UTC HH:MM after which no new export is started")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON path (.md and .png beside it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adapter_set = load_adapter_folders(args.adapters)
    model_dir = base_model_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    wanted = set(args.plan.split(",")) if args.plan else None
    plan = [p for p in PLAN if wanted is None or export_name(*p) in wanted]

    banks = {}
    for name in dict.fromkeys(p[0] for p in plan):
        method, budget = BANKS[name]
        banks[name] = merge(adapter_set, MergeConfig(method=method, budget=Budget.parse(budget) if budget else None))

    notes = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32; not the bf16 release)",
        "adapters": f"{args.adapters} ({len(adapter_set.tasks)} tasks, LoRA r and targets as trained by the suite)",
        "bank_digests": {k: bank_digest(b) for k, b in banks.items()},
        "banks": {k: {"method": v[0], "budget": v[1], "payload_bytes": banks[k].payload_bytes()} for k, v in BANKS.items() if k in banks},
        "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), 2 shared cores",
        "examples_per_task": args.examples,
        "switch_ms": "median of 21 switches to the task from another one, task files already loaded (ExecuTorch: set_task "
        "method writing shared mutable buffers; ONNX Runtime: feeding the task's slots, decoded once at load by "
        "task_decoder.onnx run with the task's LoraAdapter active; task_load_ms includes that run)",
        "decode_ms_per_token": "measured export by export while other jobs shared the 2 cores: compare latencies with "
        "decode_latency.json, where each switchable export and its merged reference decode in turns in one process",
        "program_load_ms": "opening the resident program: what a 'separate program per task' deployment pays per switch",
        "peak_rss_mb": "peak RSS of a child process that only runs the export (includes Python + torch import, see rss_baseline_mb)",
        "score": "suite metric on the runtime's own greedy outputs (batch 1); score_pytorch: PyTorch fp32 reference, same adapter",
    }
    records, seconds = _previous(args.results, args.work)
    notes["export_seconds"] = seconds
    reference_scores: dict = {}
    for bank_name, fmt, quant, merged in plan:
        if args.deadline and time.strftime("%H:%M", time.gmtime()) >= args.deadline:
            notes.setdefault("not_run", []).append(export_name(bank_name, fmt, quant, merged))
            continue
        name = export_name(bank_name, fmt, quant, merged)
        folder = args.work / name
        bank = banks[bank_name]
        if not _holds(folder, bank):
            t0 = time.time()
            export_bank(bank, model_dir, fmt, quant, folder, overwrite=True, merged_task=bank.tasks[0] if merged else None)
            notes.setdefault("export_seconds", {})[name] = round(time.time() - t0, 1)
            records = [r for r in records if r["export"] != name]  # measured on the replaced export
        if any(r["export"] == name for r in records):
            continue  # measured by an earlier run on this very export (same export id)
        tasks = [bank.tasks[0]] if merged else None
        records += bench_host([folder], tasks=tasks, banks={str(folder): bank}, model_dir=model_dir,
                              n_examples=args.examples, threads=args.threads, reference_scores=reference_scores)
        _naive(records, notes, len(bank.tasks))
        _flag_earlier_adapters(records, notes)
        write_reports(records, args.results, notes)
        print(f"{name}: done", flush=True)
    _remeasure_rss(records, args.work, args.threads)
    _naive(records, notes, len(adapter_set.tasks))
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
