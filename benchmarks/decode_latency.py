"""Decode latency of switchable exports against the same model with one adapter merged, measured
side by side: every export is opened once, then they take turns decoding, so machine noise hits
them alike. The first export is the reference.

    .venv/bin/python benchmarks/decode_latency.py out/export_host/onnx-int4-per-task-merged1 \
        out/export_host/onnx-int4-hydraopt-50 out/export_host/onnx-int4-per-task --name onnx-int4

Writes (or updates, keyed by --name) benchmarks/results/decode_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import RESULTS_DIR, machine_probe  # first: it puts this checkout on sys.path

from exporters.runtime import open_export
from hydraopt_mobile.app.records import markdown_table, write_record

RESULTS = RESULTS_DIR / "decode_latency.json"


def burst(session, tokens: int) -> float:
    """ms per token over ``tokens`` decode steps after a 16-token prefill."""
    session.prefill(list(range(1, 17)))
    start = time.perf_counter()
    for t in range(tokens):
        session.decode(100 + t)
    return (time.perf_counter() - start) * 1e3 / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", nargs="+", type=Path, help="the first is the reference (one adapter merged)")
    ap.add_argument("--name", required=True, help="key of this comparison in the results file")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    probe = machine_probe()
    torch.set_num_threads(1)
    sessions = {}
    for folder in args.exports:
        session = open_export(folder, threads=1)
        session.set_task(session.tasks[0])
        burst(session, 4)  # warm-up
        sessions[folder.name] = session
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            times[name].append(burst(session, args.tokens))
    ref = statistics.median(times[args.exports[0].name])
    rows = {name: {"median_ms_per_token": statistics.median(t), "ratio_vs_merged": statistics.median(t) / ref,
                   "runs_ms_per_token": t, "task": sessions[name].active} for name, t in times.items()}
    saved = json.loads(args.out.read_text()) if args.out.is_file() else {}
    saved[args.name] = {"reference": args.exports[0].name, "tokens": args.tokens, "rounds": args.rounds, "threads": 1, "machine_probe": probe, "exports": rows}
    write_record(args.out, saved, markdown(saved))
    print(markdown({args.name: saved[args.name]}))


def markdown(saved: dict) -> str:
    rows = ([name, export, f"{r['median_ms_per_token']:.2f}", f"{100 * (r['ratio_vs_merged'] - 1):+.1f} %"]
            for name, c in saved.items() for export, r in c["exports"].items())
    lines = ["# Decode latency, side by side (median of rounds, 1 thread)", "",
             *markdown_table(["comparison", "export", "ms / token", "vs merged reference"], rows)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
