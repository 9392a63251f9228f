"""Decode cost of the switchable slots: each ``--quant`` recipe's switchable exports (one adapter
per task, HydraOpt at 1/T) against the same recipe with one task merged into the weights, timed
side by side, token by token, in one fresh process per open order of a rotation (below).

    python benchmarks/slot_overhead.py --runtime onnx --recipes fp32,int8,int8-b16,int8-acc0,int4,int4-mixed --lock /work/runs/cpu.lock
    python benchmarks/slot_overhead.py --runtime executorch --slots q_proj,v_proj:16 \\
        --recipes fp32,8da8w,8da4w-mixed-qkv-noclip,8da4w-mixed-noclip,8da4w --lock /work/runs/cpu.lock

The banks and program signatures are quant_recipes.py's (the suite's shared-seed adapters as one
adapter per task, and HydraOpt at 1/T of the fp16 file bytes; ``--slots`` as there: each bank's own
signature by default), so a row here times the program kind a quant_recipes row scored.
``--update-recipes`` writes each row's overhead into that runtime's quant_recipes record
(``slot_overhead_pct``) with the bytes of the program timed, so a reader sees when the timed
program is not byte-identical to the scored one (an exporter change since the scores).

Timing: the merged export and the switchable ones of a recipe are open at once, each with the
merged task active. Each round prefills 16 tokens in every export, then decodes ``--tokens``
tokens, the exports taking turns token by token (the order alternating), so a slow spell of the
machine hits all of them within milliseconds. Per round: each export's ms/token and its ratio to the
merged export's in the same round. Reported: the median ms/token and the median ratio over rounds,
with a 95 % bootstrap interval of that median (resampling rounds). ``--lock``: the machine's CPU
lock, held shared while exporting and exclusive while timing (run the script bare, not under an
outer ``flock -s``). Exports are kept in ``--work`` and reused by a rerun of the same bank and recipe.

The timing runs in fresh processes (the script runs itself again with ``--time-only`` once the
exports are ready), and their rounds are pooled: in the process that had just lowered ExecuTorch
programs the switchable exports timed 4-11 % *faster* than the merged one (8da4w, 2026-12-03), in a
fresh process on the same exports 3.5-6.9 % slower; and within a process a session's speed depends
on when it was opened (the one opened first decoded 3-8 % slower than the next, ExecuTorch fp32;
on ONNX Runtime int4 a process's ratios moved by up to 4 points with the order,
onnx_slot_layouts.md). So there is one process per rotation of the open order (merged, then the
methods; then each rotated by one), every export opened first, in the middle and last once, and
each process's own median is reported beside the pooled one, with their mean. (Until 2026-12-05
two processes opened the merged reference first and last, which never opened one-per-task last nor
HydraOpt first.)

Writes benchmarks/results/slot_overhead_<runtime>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, RESULTS_DIR, cpu_lock, cpu_model, machine_probe, open_lock  # first: it puts this checkout on sys.path

from benchmarks import quant_recipes
from benchmarks.quant_recipes import exported
from exporters.backend import Session
from exporters.manifest import Manifest
from exporters.runtime import open_export
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.plotting import figure
from hydraopt_mobile.suite.model import base_model_dir

TARGET_PCT = 5.0  # issue 15: switchable slots cost at most 5 % decode time against the merged export
PREFILL = list(range(1, 17))


def interleaved(sessions: dict[str, Session], tokens: int, rounds: int) -> dict[str, list[float]]:
    """ms/token of each session per round, the sessions taking turns token by token."""
    names = list(sessions)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for s in sessions.values():
            s.prefill(PREFILL)
        spent = dict.fromkeys(names, 0.0)
        for i in range(tokens):
            for n in (names if (r + i) % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                sessions[n].decode(17 + i)
                spent[n] += time.perf_counter() - t0
        for n in names:
            out[n].append(spent[n] * 1e3 / tokens)
    return out


def median_ci(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median of ``values``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


def time_recipe(folders: dict[str, Path], task: str, tokens: int, rounds: int, shift: int = 0) -> dict[str, list[float]]:
    """ms/token per round of ``folders`` ("merged" and one per method) side by side, opened in their
    order rotated by ``shift`` (0: as given)."""
    keys = list(folders)
    order = keys[shift:] + keys[:shift]
    sessions = {}
    for key in order:
        session = open_export(folders[key], threads=1)
        session.set_task(task)
        session.prefill(PREFILL)
        for i in range(4):  # warm-up
            session.decode(17 + i)
        sessions[key] = session
    return interleaved(sessions, tokens, rounds)


def rows_from_times(quant: str, folders: dict[str, Path], task: str, times: dict[str, list[float]], processes: list[str] | None = None) -> list[dict]:
    """One row per method from per-round ms/token (``times[key][i]``: round i, the same round for
    every key), the overhead from each round's ratio to the merged reference. ``processes``: the
    rounds are those processes' in turn, equally many each; each one's own median is kept too
    (``slot_overhead_pct_by_process``), since the open order biases a process's ratios (module docstring)."""
    merged = times["merged"]
    rows = []
    for method in [k for k in folders if k != "merged"]:
        ratios = [a / b for a, b in zip(times[method], merged)]
        lo, hi = median_ci(ratios)
        per = len(ratios) // len(processes) if processes else 0
        by_process = {name: 100 * (statistics.median(ratios[i * per : (i + 1) * per]) - 1) for i, name in enumerate(processes or [])}
        mean = statistics.mean(by_process.values()) if by_process else None
        m = Manifest.read(folders[method])
        rows.append({
            "quant": quant, "method": method, "task": task,
            "slots": {name.removesuffix(".lora_a"): shape[0] for name, shape in m.slots if name.endswith(".lora_a")},
            "program_bytes": m.bytes_of("program"), "merged_program_bytes": Manifest.read(folders["merged"]).bytes_of("program"),
            "ms_per_token": statistics.median(times[method]), "merged_ms_per_token": statistics.median(merged),
            "slot_overhead_pct": 100 * (statistics.median(ratios) - 1),
            "slot_overhead_pct_ci95": [100 * (lo - 1), 100 * (hi - 1)],
            "meets_target": 100 * (statistics.median(ratios) - 1) <= TARGET_PCT,
            "slot_overhead_pct_by_process": by_process, "slot_overhead_pct_mean_of_processes": mean,
            "runs_ms_per_token": times[method], "merged_runs_ms_per_token": merged,
        })
    return rows


def signature_label(slots: dict[str, int]) -> str:
    """``q_proj,v_proj: ranks 1-2 (60 slots)``: which module kinds carry slots, and their ranks."""
    kinds = sorted({name.split(".")[-1] for name in slots})
    ranks = sorted(set(slots.values()))
    span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    return f"{','.join(kinds)}: {span} ({len(slots)} slots)"


def _first(process: str) -> str:
    """``merged`` from the process name ``merged_first``."""
    return process.removesuffix("_first")


def markdown(rows: list[dict], notes: dict) -> str:
    processes = list(rows[0].get("slot_overhead_pct_by_process", {})) if rows else []
    lines = [f"# Decode cost of the switchable slots ({notes['runtime']})", ""]
    lines += [f"- **{k}**: {v}" for k, v in notes.items()]
    lines += ["", f"Target (issue 15): at most {TARGET_PCT:.0f} % against the same recipe with the task merged in.", ""]
    table = [[r["quant"], r["method"], signature_label(r["slots"]), f"{r['merged_ms_per_token']:.2f}", f"{r['ms_per_token']:.2f}",
              f"{r['slot_overhead_pct']:+.1f} [{r['slot_overhead_pct_ci95'][0]:+.1f}, {r['slot_overhead_pct_ci95'][1]:+.1f}]",
              " / ".join(f"{v:+.1f}" for v in r.get("slot_overhead_pct_by_process", {}).values()) or "-",
              "-" if r.get("slot_overhead_pct_mean_of_processes") is None else f"{r['slot_overhead_pct_mean_of_processes']:+.1f}",
              "yes" if r["meets_target"] else "no"] for r in rows]
    lines += markdown_table(["quant", "bank", "slots", "merged ms/token", "switchable ms/token", "overhead % [95 % CI]",
                             "per process %" + (f" (opened first: {' / '.join(_first(k) for k in processes)})" if processes else ""),
                             "mean of processes %", "<= 5 %"], table, "lllrrrrrl")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], png: Path, runtime: str) -> None:
    labels = [f"{r['quant']}\n{r['method']}" for r in rows]
    values = [r["slot_overhead_pct"] for r in rows]
    err = [[v - r["slot_overhead_pct_ci95"][0] for v, r in zip(values, rows)], [r["slot_overhead_pct_ci95"][1] - v for v, r in zip(values, rows)]]
    with figure(png, figsize=(8, 4)) as (_, ax):
        ax.bar(range(len(rows)), values, yerr=err, capsize=3, color=["tab:blue" if r["method"] == "none" else "tab:orange" for r in rows])
        ax.axhline(TARGET_PCT, ls="--", c="grey", label=f"target {TARGET_PCT:.0f} %")
        ax.axhline(0, c="black", lw=0.5)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("decode time vs merged export (%)")
        ax.set_title(f"{runtime}: switchable slots vs the task merged in (median of rounds, 95 % CI)")
        ax.legend(fontsize=7)


def update_recipes(results: Path, rows: list[dict], source: str, runtime: str) -> int:
    """Write each row's overhead into the quant_recipes record of the same quant and bank; returns
    how many records were updated (the records' scores and bytes are left as quant_recipes.py wrote them)."""
    data = json.loads(results.read_text())
    n = 0
    for rec in data["records"]:
        row = next((r for r in rows if r["quant"] == rec["quant"] and r["method"] == rec["method"]), None)
        if row is None:
            continue
        rec.update({"slot_overhead_pct": row["slot_overhead_pct"], "slot_overhead_pct_ci95": row["slot_overhead_pct_ci95"],
                    "slot_overhead_timed_program_bytes": row["program_bytes"],
                    "slot_overhead_timed_program_is_scored_program": row["program_bytes"] == rec["program_bytes"]})
        n += 1
    data["notes"]["slot_overhead_pct"] = (
        f"from {source} (benchmarks/slot_overhead.py --update-recipes): decode time of the switchable export against the same "
        "recipe with the task merged in, side by side, median of rounds; slot_overhead_timed_program_bytes is the program "
        "timed (not the scored one where slot_overhead_timed_program_is_scored_program is false: an exporter change since the scores)")
    _, _, title, program_file = quant_recipes.RUNTIMES[runtime]
    write_record(results, data, quant_recipes.markdown(data["records"], data["notes"], title),
                 lambda png: quant_recipes.plot(data["records"], png, title, program_file))
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", choices=sorted(quant_recipes.RUNTIMES), default="onnx")
    ap.add_argument("--recipes", default="fp32,int8,int4,int4-mixed", help="comma-separated --quant names")
    ap.add_argument("--slots", default=None, help="--slots spec of the switchable programs (default: each bank's own signature)")
    ap.add_argument("--methods", default="none,hydraopt")
    ap.add_argument("--task", default="country-de", help="the task merged into the reference and active in the switchable exports")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--work", type=Path, default=None, help="default: out/slot_overhead_<runtime>")
    ap.add_argument("--lock", type=Path, help="CPU lock file: held shared to export, exclusive to time")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/slot_overhead_<runtime>.json")
    ap.add_argument("--update-recipes", action="store_true", help="write the overheads into the runtime's quant_recipes record")
    ap.add_argument("--time-only", type=Path, default=None, metavar="TIMES_JSON",
                    help="internal: time the exports already in --work in this process and write the per-round times to "
                         "TIMES_JSON (what the script runs itself with, in fresh processes; module docstring)")
    ap.add_argument("--shift", type=int, default=0, help="with --time-only: open the exports in their order rotated by this")
    ap.add_argument("--report-only", action="store_true", help="write the record from the timing processes' files already in --work (no export, no timing)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = args.work or ROOT / "out" / f"slot_overhead_{args.runtime}"
    out = args.out or RESULTS_DIR / f"slot_overhead_{args.runtime}.json"
    lock_fd = open_lock(args.lock)
    recipes = args.recipes.split(",")
    unknown = [q for q in recipes if q not in quant_recipes.RUNTIMES[args.runtime][0]]
    if unknown:
        ap.error(f"--recipes: {', '.join(unknown)} not a {args.runtime} --quant ({', '.join(quant_recipes.RUNTIMES[args.runtime][0])})")

    seconds_file = work / "export_seconds.json"
    if not args.time_only and not args.report_only:
        banks = quant_recipes.suite_banks()
        model_dir = base_model_dir()
        export_seconds: dict[str, float | None] = {}
        with cpu_lock(lock_fd, fcntl.LOCK_SH):
            for quant in recipes:
                export_seconds[f"merged-{quant}"] = exported(banks["none"], model_dir, args.runtime, quant, work / f"merged-{quant}", None, args.task)
                for method in args.methods.split(","):
                    export_seconds[f"{method}-{quant}"] = exported(banks[method], model_dir, args.runtime, quant, work / f"{method}-{quant}", args.slots, None)
                print(f"[slot_overhead] {quant}: exports ready", flush=True)
        seconds_file.write_text(json.dumps(export_seconds))
    folders = {quant: {"merged": work / f"merged-{quant}", **{m: work / f"{m}-{quant}" for m in args.methods.split(",")}} for quant in recipes}
    keys = list(folders[recipes[0]])  # the exports of a recipe, in their open order before rotation
    if args.time_only:
        with cpu_lock(lock_fd, fcntl.LOCK_EX) as waited:
            started, load_start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.getloadavg()
            probe = machine_probe()  # under the exclusive lock, before the timing
            times = {quant: time_recipe(folders[quant], args.task, args.tokens, args.rounds, args.shift) for quant in recipes}
            load_end = os.getloadavg()
        args.time_only.write_text(json.dumps({"times": times, "timed": f"{started} (opened: {', '.join(keys[args.shift:] + keys[:args.shift])}); "
                                              f"CPU lock {'held exclusive' if lock_fd is not None else 'not taken'} (waited {waited} s); load average "
                                              f"1/5/15 min at start {[round(x, 2) for x in load_start]}, at end {[round(x, 2) for x in load_end]}",
                                              "machine_probe": probe}))
        return
    runs = []
    for shift in range(len(keys)):  # each in a fresh process, each export opened first once (module docstring)
        path = work / f"times-{keys[shift]}-first.json"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--time-only", str(path), "--shift", str(shift)]
        if not args.report_only and subprocess.run(cmd).returncode:
            raise SystemExit(f"[slot_overhead] timing process failed: {' '.join(cmd)}")
        runs.append(json.loads(path.read_text()))
    export_seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    rows = []
    for quant in recipes:  # rounds of both processes pooled; each round's ratio is within its own process
        pooled = {key: [t for run in runs for t in run["times"][quant][key]] for key in folders[quant]}
        rows += rows_from_times(quant, folders[quant], args.task, pooled, [f"{k}_first" for k in keys])
        print(f"[slot_overhead] {quant}: " + ", ".join(f"{r['method']} {r['slot_overhead_pct']:+.1f} %" for r in rows if r["quant"] == quant), flush=True)
    probe = runs[0]["machine_probe"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    notes = {
        "runtime": quant_recipes.RUNTIMES[args.runtime][2],
        "command": "python benchmarks/slot_overhead.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False) and k not in ("work", "out", "update_recipes", "time_only", "shift", "report_only")),
        "commit": commit + (" (written with --report-only from the timing processes' files in --work, timed earlier)" if args.report_only else ""),
        "timed": " | ".join(run["timed"] for run in runs),
        "machine": f"{cpu_model()}, {platform.machine()}, 1 runtime thread: a host timing, not phone speed", "machine_probe": probe,
        "banks": "; ".join(f"{m}: {quant_recipes.BANKS[m]}" for m in args.methods.split(",")) + " (quant_recipes.py's banks, from the suite's shared-seed adapters)",
        "reference": f"the same recipe with {args.task}'s adapter merged into the weights (no slots); the switchable exports decode with {args.task} active",
        "slots": args.slots or "each bank's own signature (hydraopt export's default)",
        "method": f"{args.rounds} rounds x {args.tokens} decode tokens after a 16-token prefill in each of {len(keys)} fresh processes, one per "
                  "rotation of the open order (each export opened first once); the exports take turns token by token; overhead = median over the "
                  "pooled rounds of (switchable ms/token / merged ms/token in the same round) - 1, 95 % bootstrap interval over rounds; each process's "
                  "own median beside it, and their mean (the open order biases a process's ratios)",
        "export_seconds": {k: v for k, v in export_seconds.items() if v is not None} or "all exports reused from an earlier run in --work",
        "process": f"timed in {len(keys)} fresh processes, one per rotation of the open order, not the one that exported (module docstring)",
    }
    write_record(out, {"notes": notes, "records": rows}, markdown(rows, notes), lambda png: plot(rows, png, notes["runtime"]))
    print(markdown(rows, notes))
    if args.update_recipes:
        n = update_recipes(quant_recipes.RUNTIMES[args.runtime][1], rows, out.name, args.runtime)
        print(f"[slot_overhead] {n} quant_recipes records updated", flush=True)


if __name__ == "__main__":
    main()
