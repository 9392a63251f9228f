"""``hydraopt bench ethos-u`` reproduces the benchmark: the same HydraOpt 1/T merge of the committed
suite adapters, written as a bundle, run through the command line as a user runs it (both NPUs, both
quantisations, the benchmark's three tasks), against the committed ``device_ethos-u.json`` records of
the same variant, a compile the backend refuses included. Every figure is deterministic (PT2E
calibration on fixed inputs, Vela, the TOSA reference model's integer arithmetic), so the comparison
is equality, not a tolerance; a refusal's message is compared with FX's numbered node names
(``getitem_7``) made ``getitem_#``: the counter depends on what the process traced before.

    python benchmarks/ethos_u_cli_check.py      # four real-width Arm lowerings: ~10-15 min on 2 shared cores
    python benchmarks/ethos_u_cli_check.py --reuse   # the comparison again from the command's records in --out

Writes benchmarks/results/ethos_u_cli_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, ROOT, SUITE_ADAPTERS  # first: it puts this checkout on sys.path

from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.bundle import write_bundle
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge

BENCHMARK = RESULTS_DIR / "device_ethos-u.json"
TASKS = ("country-de", "topic-en", "currency-es")  # the benchmark's, in its order
FAILED_FIELDS = ("compiled", "error")
FIELDS = ("compiled", "delegates", "cpu_ops", "all_on_npu", "cycles", "cycles_npu", "clock_mhz", "estimated_ms", "sram_bytes", "flash_bytes",
          "dram_bytes", "npu_weights_bytes", "pte_bytes", "ranks", "task_input_bytes", "switch", "max_abs_err", "fp32_max_abs",
          "rel_err_max", "effect_cosine_min", "switch_back_identical", "tasks_differ", "runs")


def comparable(field: str, value):
    """``value`` as compared: an error message with FX's node counters masked."""
    return re.sub(r"\b([a-z_]+)_\d+\b", r"\1_#", value) if field == "error" and isinstance(value, str) else value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--npus", default="ethos-u55-128,ethos-u85-256")
    ap.add_argument("--quants", default="a8w8,a16w8")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "ethos_u_cli_check.json")
    ap.add_argument("--reuse", action="store_true", help="compare the command's records already in --out (no run)")
    args = ap.parse_args()
    npus, quants = args.npus.split(","), args.quants.split(",")
    want = {(r["npu"], r["quant"]): r for r in json.loads(BENCHMARK.read_text())["records"]
            if r["variant"] == "hydraopt-1T" and r["npu"] in npus and r["quant"] in quants}
    if args.reuse:
        previous = json.loads(args.out.read_text())
        records, command, wall = previous["records"], previous["meta"]["command"], previous["meta"]["command_wall_s"]
    else:
        records, command, wall = run_command(npus, quants)
    got = {(r["npu"], r["quant"]): r for r in records}
    if set(got) != set(want):
        raise SystemExit(f"the command gave records for {sorted(got)}, the benchmark has {sorted(want)}")
    rows = [[f"{npu} {quant}", f, json.dumps(ref.get(f))[:60], json.dumps(got[npu, quant].get(f))[:60],
             comparable(f, ref.get(f)) == comparable(f, got[npu, quant].get(f))]
            for (npu, quant), ref in sorted(want.items()) for f in (FIELDS if ref["compiled"] else FAILED_FIELDS)]
    same = all(r[-1] for r in rows)
    meta = {"command": command, "bundle": "HydraOpt at 1/T of the committed suite adapters (shared-seed), written by write_bundle", "reference": f"{BENCHMARK.name}: the hydraopt-1T records",
            "command_wall_s": wall, "compared_again_from_the_saved_records": args.reuse, "all_equal": same,
            "note": "one decoder layer (layer 0, 16 tokens); cycles are Vela's estimate, numerics the TOSA reference model's"}
    md = ["# `hydraopt bench ethos-u` vs the benchmark's records (hydraopt-1T)", "", *[f"- {k}: {v}" for k, v in meta.items()], "",
          *markdown_table(["npu, quant", "field", "benchmark", "hydraopt bench ethos-u", "equal"], rows), ""]
    write_record(args.out, {"meta": meta, "records": list(got.values()), "benchmark_records": list(want.values())}, "\n".join(md))
    print("\n".join(md))
    if not same:
        raise SystemExit("the command's records differ from the benchmark's")


def run_command(npus: list[str], quants: list[str]) -> tuple[list[dict], str, float]:
    """The command's records on a HydraOpt 1/T bundle of the suite adapters, the command, its seconds."""
    adapters = load_adapter_folders(SUITE_ADAPTERS / "shared-seed")
    bank = merge(adapters, MergeConfig(method="hydraopt", budget=Budget(fraction=1 / len(adapters.task_names))))
    with tempfile.TemporaryDirectory(prefix="ethos-u-cli-check-") as tmp:
        bundle = write_bundle(bank, Path(tmp) / "bundle")
        command = [sys.executable, "-m", "hydraopt_mobile.app.cli", "bench", "ethos-u", str(bundle), *[a for t in TASKS for a in ("--task", t)],
                   *[a for n in npus for a in ("--npu", n)], *[a for q in quants for a in ("--quant", q)], "--json"]
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = round(time.perf_counter() - t0, 1)
    if done.returncode != 0:
        raise SystemExit(f"hydraopt bench ethos-u failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout), "hydraopt bench ethos-u BUNDLE " + " ".join(command[6:]), wall


if __name__ == "__main__":
    main()
