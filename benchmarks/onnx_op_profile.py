"""Where the LoRA path's decode time goes in ONNX Runtime: per-op-type kernel time of switchable
exports against the same model with one adapter merged, from ORT's own profiler.

    .venv/bin/python benchmarks/onnx_op_profile.py out/export_host/onnx-int4-per-task-merged1 \
        out/export_host/onnx-int4-hydraopt-50 [--tokens 32] [--rounds 3]

Each export decodes ``--tokens`` tokens after a 16-token prefill, one ORT thread, with its first
task active; the exports alternate for ``--rounds`` rounds and medians are reported. Writes
benchmarks/results/onnx_op_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from common import RESULTS_DIR, burst  # first: it puts this checkout on sys.path

from exporters.onnx_backend import OrtSession
from hydraopt_mobile.app.records import markdown_table, write_record

RESULTS = RESULTS_DIR / "onnx_op_profile.json"


class ProfiledSession(OrtSession):
    """The exporters' own ONNX Runtime session (decoder step, IOBinding, slot binding), its program
    opened with ORT's profiler on."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.prefix = prefix
        super().__init__(folder)

    def _open(self, program: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = self.prefix
        return ort.InferenceSession(str(program), options, providers=["CPUExecutionProvider"])


def profile_once(folder: Path, tokens: int) -> dict:
    """Decode ``tokens`` tokens through :class:`ProfiledSession` with the export's first task active."""
    with tempfile.TemporaryDirectory() as tmp:
        session = ProfiledSession(folder, str(Path(tmp) / "profile"))
        if session.manifest.slots:
            session.set_task(session.tasks[0])
        wall = burst(session, tokens) / 1e3
        events = json.loads(Path(session.session.end_profiling()).read_text())
    per_op: dict[str, float] = collections.Counter()
    nodes: dict[str, int] = collections.Counter()
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    decode_start = runs[1]["ts"]  # run 0 is the prefill
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= decode_start:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / tokens
            nodes[e["args"]["op_name"]] += 1
    return {"wall_ms_per_token": wall * 1e3, "kernel_ms_per_token": sum(per_op.values()),
            "nodes_per_token": sum(nodes.values()) / tokens, "op_ms_per_token": dict(per_op),
            "op_nodes_per_token": {k: v / tokens for k, v in nodes.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", nargs="+", type=Path, help="the first is the reference (one adapter merged)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {e.name: [] for e in args.exports}
    for _ in range(args.rounds):
        for export in args.exports:
            runs[export.name].append(profile_once(export, args.tokens))
    summary = {}
    for name, rs in runs.items():
        ops = {op for r in rs for op in r["op_ms_per_token"]}
        summary[name] = {
            "wall_ms_per_token": statistics.median(r["wall_ms_per_token"] for r in rs),
            "kernel_ms_per_token": statistics.median(r["kernel_ms_per_token"] for r in rs),
            "nodes_per_token": rs[0]["nodes_per_token"],
            "op_ms_per_token": {op: statistics.median(r["op_ms_per_token"].get(op, 0.0) for r in rs) for op in ops},
            "op_nodes_per_token": rs[0]["op_nodes_per_token"],
        }
    ref = summary[args.exports[0].name]
    for s in summary.values():
        s["wall_ratio_vs_reference"] = s["wall_ms_per_token"] / ref["wall_ms_per_token"]
    notes = {"command": " ".join(sys.argv), "tokens": args.tokens, "rounds": args.rounds, "threads": 1,
             "reference": args.exports[0].name, "ort": ort.__version__}
    write_record(args.out, {"notes": notes, "exports": summary}, markdown(summary, args.exports[0].name))
    print(markdown(summary, args.exports[0].name))


def markdown(summary: dict, reference: str) -> str:
    names = list(summary)
    wall = ([key, *(f"{summary[n][key]:.3f}" for n in names)] for key in ("wall_ms_per_token", "wall_ratio_vs_reference", "kernel_ms_per_token", "nodes_per_token"))
    ops = sorted({op for s in summary.values() for op in s["op_ms_per_token"]},
                 key=lambda op: -max(s["op_ms_per_token"].get(op, 0) - summary[reference]["op_ms_per_token"].get(op, 0) for s in summary.values()))
    by_op = ([op, *(f"{summary[n]['op_ms_per_token'].get(op, 0):.3f} ({summary[n]['op_nodes_per_token'].get(op, 0):.0f})" for n in names)] for op in ops[:12])
    lines = ["# ONNX Runtime decode profile (medians, ms per token, 1 thread)", "",
             "The profiler adds a cost per node, so wall ratios here overstate the extra nodes' cost: "
             "slot_overhead_onnx.md has the ratios without it.", "",
             *markdown_table(["", *names], wall),
             "", "Kernel ms per token (nodes) by op type, largest growth over the reference first:", "",
             *markdown_table(["op", *names], by_op)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
