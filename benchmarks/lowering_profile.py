"""Where the ExecuTorch (XNNPACK) lowering spends its time, and what exporters/et_lowering.py saves.

    flock -x /work/runs/cpu.lock .venv/bin/python benchmarks/lowering_profile.py [--layers 2,4] [--full] [--profile before,after]
        [--variants before,after,after-without-skip_idle_decompositions] [--results PATH]

SmolLM2-135M (the real config and weights, custom-ops attention, 8da4w, the LoRA slots of
benchmarks/export_reuse.py: ``q_proj,v_proj:16``), cut to its first L layers or whole (``--full``),
exported by ``exporters/executorch_backend.py: export_program`` side by side in one process:

- ``before``: the export as on main before this change (``fast=False`` under ``shallow_provenance``);
- ``after``: ``fast=True`` (``shallow_provenance`` and ``exporters/et_lowering.py: fast_lowering``);
- ``after-without-PATCH`` (``--variants``): ``after`` without one of ``et_lowering.PATCHES``
  (named by function), which measures that patch's share side by side.

Per run: wall and CPU seconds of the whole export (base model loaded from disk, quantised, exported,
lowered, written; 1 thread, no profiler), seconds per phase, and the program's SHA-256 (before
and after must be equal). ``--full`` is the issue's first-export time (target 300 s). Then one
run per variant of ``--profile`` at the largest L under cProfile: the cumulative seconds of the
functions in :data:`WATCH` and the top functions (inflated by the profiler: read them as shares).
The growth exponent between two layer counts is log(t2 / t1) / log(L2 / L1) (1: linear).

Writes benchmarks/results/lowering_profile.{json,md} after every run (the whole model first); the load
average before and after each run.
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import hashlib
import json
import math
import os
import platform
import pstats
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from common import ROOT, machine_probe  # first: it puts this checkout on sys.path

from exporters import et_lowering
from exporters.et_lowering import executorch_version
from exporters.executorch_backend import export_program, shallow_provenance
from exporters.slots import attach_slots, parse_slot_spec
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.base_model import load_causal_lm
from hydraopt_mobile.suite.model import base_model_dir

RESULTS = ROOT / "benchmarks" / "results" / "lowering_profile.json"
SLOTS = "q_proj,v_proj:16"
QUANT = "8da4w"
MAX_CACHE_LEN = 256  # exporters/export.py: DEFAULT_MAX_CACHE_LEN
# label -> (file name, function name); the largest cumulative entry of that name
WATCH = {
    "to_edge_transform_and_lower": ("_program.py", "to_edge_transform_and_lower"),
    "  edge conversion (_gen_edge_manager_for_partitioners)": ("_program.py", "_gen_edge_manager_for_partitioners"),
    "    ExportedProgram.run_decompositions (all calls)": ("exported_program.py", "run_decompositions"),
    "    _generate_edge_program (ATen-to-edge passes)": ("_program.py", "_generate_edge_program"),
    "  to_backend": ("_program.py", "to_backend"),
    "    partitioning (_create_partitions)": ("backend_api.py", "_create_partitions"),
    "    XnnpackBackend.preprocess (all partitions)": ("xnnpack_preprocess.py", "preprocess"),
    "      XNNPACKPassManager.transform": ("_passes/__init__.py", "transform"),
    "ExportPass re-traces (exir pass_base call_submodule)": ("exir/pass_base.py", "call_submodule"),
    "ExportedProgramPassManager.check": ("exir/pass_manager.py", "check"),
    "to_executorch": ("_program.py", "to_executorch"),
}
TOP = 25
WITHOUT = "after-without-"  # variant prefix: ``after`` without the named patch of et_lowering.PATCHES


def load(layers: int | None) -> torch.nn.Module:
    model = load_causal_lm(base_model_dir())
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def without(name: str) -> tuple:
    """``et_lowering.PATCHES`` less the patch named ``name`` (a clear error if there is none)."""
    kept = tuple(p for p in et_lowering.PATCHES if p.__name__ != name)
    if len(kept) == len(et_lowering.PATCHES):
        raise SystemExit(f"--variants: exporters/et_lowering.py has no patch {name!r} "
                         f"(PATCHES: {', '.join(p.__name__ for p in et_lowering.PATCHES)})")
    return kept


@contextlib.contextmanager
def lowering_variant(variant: str) -> Iterator[None]:
    """The settings of ``variant`` (module docstring) while its export runs."""
    if variant == "before":
        with shallow_provenance():
            yield
    elif variant.startswith(WITHOUT):
        saved, et_lowering.PATCHES = et_lowering.PATCHES, without(variant[len(WITHOUT):])
        try:
            yield
        finally:
            et_lowering.PATCHES = saved
    else:
        yield


def run(layers: int | None, variant: str, profile: cProfile.Profile | None = None) -> dict:
    """One export, timed from loading the base model to the written program."""
    phases: dict[str, float] = {}
    load_before = loadavg()
    with tempfile.TemporaryDirectory() as tmp, lowering_variant(variant):
        t0, c0 = time.perf_counter(), time.process_time()
        model = load(layers)
        shapes = attach_slots(model, parse_slot_spec(SLOTS, model))
        if profile:
            profile.enable()
        path = export_program(model, shapes, Path(tmp), QUANT, MAX_CACHE_LEN, phases, fast=variant != "before")
        if profile:
            profile.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"layers": layers or model.config.num_hidden_layers, "full": layers is None, "variant": variant,
            "slots": len(shapes), "export_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "phases_s": {k: round(v, 2) for k, v in phases.items()}, "program_sha256": digest,
            "loadavg_before": load_before, "loadavg_after": loadavg()}


def attribute(profile: cProfile.Profile) -> tuple[dict[str, float], list[list]]:
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)
    watched = {label: round(max((v[3] for (f, _, n), v in stats.items() if f.endswith(file) and n == name), default=0.0), 2)
               for label, (file, name) in WATCH.items()}
    top = sorted(stats.items(), key=lambda kv: -kv[1][3])[:TOP]
    return watched, [[f"{Path(f).name}:{line}({name})", v[1], round(v[2], 2), round(v[3], 2)] for (f, line, name), v in top]


def exponent(records: list[dict], variant: str) -> float | None:
    rows = sorted((r["layers"], r["phases_s"]["to_edge_transform_and_lower"]) for r in records
                  if r["variant"] == variant and not r["full"] and "profile" not in r)
    if len(rows) < 2:
        return None
    (l1, t1), (l2, t2) = rows[0], rows[-1]
    return round(math.log(t2 / t1) / math.log(l2 / l1), 2)


def write(path: Path, records: list[dict], planned: int, variants: list[str], probe: dict) -> None:
    """The JSON and Markdown records of the runs so far (rewritten after each run)."""
    plain = [r for r in records if "profile" not in r]
    same = {str(r["layers"]): len({q["program_sha256"] for q in records if q["layers"] == r["layers"]}) == 1 for r in plain}
    notes = {
        "model": f"SmolLM2-135M-Instruct (real weights), cut to L layers or whole, custom-ops attention, {QUANT}, "
                 f"slots {SLOTS} per layer, KV cache {MAX_CACHE_LEN}",
        "variants": {v: ("fast=False under shallow_provenance (exports on main before exporters/et_lowering.py)" if v == "before"
                         else "fast=True: shallow_provenance + exporters/et_lowering.py fast_lowering" if v == "after"
                         else f"as after, without et_lowering.{v[len(WITHOUT):]}") for v in variants},
        "export_seconds": "wall seconds from loading the base model to the written program (1 thread, no profiler)",
        "executorch": executorch_version(), "torch": torch.__version__, "threads": 1,
        "machine": f"{platform.machine()}, 2 cores; loadavg_before/after per run (other sessions share the machine)",
        "machine_probe": probe,
        "runs": f"{len(records)} of {planned} planned, after an unrecorded 1-layer warm-up export",
        "same_program_bytes": same, "to_edge_growth_exponent": {v: exponent(records, v) for v in variants},
        "profile": "cumulative seconds under cProfile (inflated by the profiler; shares, not timings)",
    }
    rows = [(r["layers"], "whole" if r["full"] else "cut", r["variant"], r["export_seconds"], r["cpu_seconds"],
             r["phases_s"]["torch_export"], r["phases_s"]["to_edge_transform_and_lower"], r["phases_s"]["to_executorch"],
             r["program_sha256"][:12], " ".join(map(str, r["loadavg_before"])))
            for r in plain]
    lines = [f"# ExecuTorch 8da4w export of SmolLM2-135M: {' / '.join(variants)} (exporters/et_lowering.py; XNNPACK, 1 thread)", "",
             *markdown_table(["L", "model", "variant", "export s", "CPU s", "torch_export s", "to_edge_transform_and_lower s",
                              "to_executorch s", "program sha256", "loadavg"], rows, "rllrrrrrll"),
             "", f"Runs: {notes['runs']}. Same program bytes in every variant (per L): {json.dumps(same)}",
             f"Growth exponent of to_edge_transform_and_lower with L: {json.dumps(notes['to_edge_growth_exponent'])}", ""]
    for r in records:
        if "profile" in r:
            lines += [f"## Where the export goes ({r['variant']}, L={r['layers']}, under cProfile: "
                      f"to_edge_transform_and_lower {r['phases_s']['to_edge_transform_and_lower']} s)", "",
                      *markdown_table(["function", "cumulative s"], r["profile"].items(), "lr"), "",
                      *markdown_table(["top functions by cumulative time", "calls", "own s", "cumulative s"], r["profile_top"], "lrrr"), ""]
    write_record(path, {"notes": notes, "records": records}, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,4", help="layer counts of the cut models ('' for none)")
    parser.add_argument("--full", action="store_true", help="also the whole model, before and after (about 8 + 4 min), first")
    parser.add_argument("--profile", default="before,after", help="variants profiled at the largest L ('' for none)")
    parser.add_argument("--variants", default="before,after",
                        help=f"variants timed at every L: before, after, {WITHOUT}PATCH (module docstring)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = [int(x) for x in args.layers.split(",") if x]
    profiled = [v for v in args.profile.split(",") if v] if counts else []
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in ("before", "after") and not v.startswith(WITHOUT):
            raise SystemExit(f"--variants: unknown variant {v!r} (before, after, {WITHOUT}PATCH)")
        if v.startswith(WITHOUT):
            without(v[len(WITHOUT):])
    plan = [(layers, variant, False) for layers in [*([None] if args.full else []), *counts] for variant in variants]
    plan += [(max(counts), variant, True) for variant in profiled]
    probe = machine_probe()  # before any export: the machine idle
    run(1, "before")  # warm-up, not recorded: the process's one-time costs (imports, XNNPACK's pattern graphs)
    records: list[dict] = []
    for layers, variant, profiling in plan:  # the records are written after every run
        profile = cProfile.Profile() if profiling else None
        record = run(layers, variant, profile)
        if profile:
            record["profile"], record["profile_top"] = attribute(profile)
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "profile_top"}), flush=True)
        write(args.results, records, len(plan), variants, probe)


if __name__ == "__main__":
    main()
