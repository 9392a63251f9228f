"""``hydraopt bench ethos-u`` reproduces the benchmark: the same HydraOpt 1/T merge of the committed
suite adapters, written as a bundle, run through the command line as a user runs it (one NPU, one
quantisation, the benchmark's three tasks), against the committed ``device_ethos-u.json`` record of
the same variant. Every figure is deterministic (PT2E calibration on fixed inputs, Vela, the TOSA
reference model's integer arithmetic), so the comparison is equality, not a tolerance.

    python benchmarks/ethos_u_cli_check.py      # one real-width Arm lowering: ~5-10 min on 2 shared cores

Writes benchmarks/results/ethos_u_cli_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
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
FIELDS = ("compiled", "delegates", "cpu_ops", "all_on_npu", "cycles", "cycles_npu", "clock_mhz", "estimated_ms", "sram_bytes", "flash_bytes",
          "dram_bytes", "npu_weights_bytes", "pte_bytes", "ranks", "task_input_bytes", "switch", "max_abs_err", "fp32_max_abs",
          "rel_err_max", "effect_cosine_min", "switch_back_identical", "tasks_differ", "runs")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--npu", default="ethos-u85-256")
    ap.add_argument("--quant", default="a8w8")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "ethos_u_cli_check.json")
    args = ap.parse_args()
    [want] = [r for r in json.loads(BENCHMARK.read_text())["records"]
              if (r["variant"], r["npu"], r["quant"]) == ("hydraopt-1T", args.npu, args.quant)]
    adapters = load_adapter_folders(SUITE_ADAPTERS / "shared-seed")
    bank = merge(adapters, MergeConfig(method="hydraopt", budget=Budget(fraction=1 / len(adapters.task_names))))
    with tempfile.TemporaryDirectory(prefix="ethos-u-cli-check-") as tmp:
        bundle = write_bundle(bank, Path(tmp) / "bundle")
        command = [sys.executable, "-m", "hydraopt_mobile.app.cli", "bench", "ethos-u", str(bundle), *[a for t in TASKS for a in ("--task", t)],
                   "--npu", args.npu, "--quant", args.quant, "--json"]
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = round(time.perf_counter() - t0, 1)
    if done.returncode != 0:
        raise SystemExit(f"hydraopt bench ethos-u failed ({done.returncode}): {done.stderr[-3000:]}")
    [got] = json.loads(done.stdout)
    rows = [[f, json.dumps(want.get(f))[:70], json.dumps(got.get(f))[:70], want.get(f) == got.get(f)] for f in FIELDS]
    same = all(r[-1] for r in rows)
    meta = {"command": "hydraopt bench ethos-u BUNDLE " + " ".join(command[6:]), "bundle": "HydraOpt at 1/T of the committed suite adapters "
            f"(shared-seed, {len(adapters.task_names)} tasks), written by write_bundle", "reference": f"{BENCHMARK.name}: hydraopt-1T/{args.npu}/{args.quant}",
            "command_wall_s": wall, "all_equal": same,
            "note": "one decoder layer (layer 0, 16 tokens); cycles are Vela's estimate, numerics the TOSA reference model's"}
    md = [f"# `hydraopt bench ethos-u` vs the benchmark's record ({args.npu}, {args.quant})", "", *[f"- {k}: {v}" for k, v in meta.items()], "",
          *markdown_table(["field", "benchmark", "hydraopt bench ethos-u", "equal"], rows), ""]
    write_record(args.out, {"meta": meta, "record": got, "benchmark_record": want}, "\n".join(md))
    print("\n".join(md))
    if not same:
        raise SystemExit("the command's record differs from the benchmark's")


if __name__ == "__main__":
    main()
