"""Merge speed of two revisions, side by side: each revision's own merge_speed.py (Llama-3.2-1B
attention shapes, 40 tasks) or merge_speed_8b.py (Llama-3-8B shapes, 100 tasks, streamed from disk),
run alternately in child processes on this machine, so that the ratio is like for like however fast
or busy the machine is (the pool's machines differ by up to 1.8x; benchmarks/common.py).

Both revisions' ``hydraopt_mobile`` and ``benchmarks`` are extracted from git (``git archive``) at the
start: edits made while this runs cannot leak into either. Rounds alternate the order (base first,
then new first, ...). Reported per revision: every run's ``merge_s_three_budgets`` and
``peak_rss_mb``, their medians, the ratio of the medians (new / base) and of each round's pair;
and whether the two revisions wrote the same file bytes at every budget (and the largest difference
of the budgets' mean relative errors). The 8B adapters are generated once (not timed) into the
cache folder merge_speed_8b.py uses and shared by both revisions. Run it with no other heavy job.

    python benchmarks/merge_speed_side_by_side.py --base REV [--new HEAD] [--shape 1b|8b] [--layers N] [--rounds 3] [--threads 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from common import ROOT, machine_probe  # first: it puts this checkout on sys.path

from hydraopt_mobile.suite.model import cache_root

RESULTS = ROOT / "benchmarks" / "results"
SCRIPTS = {"1b": "merge_speed.py", "8b": "merge_speed_8b.py"}
TASKS = {"1b": 40, "8b": 100}


def extract(rev: str, into: Path) -> str:
    """``rev``'s code and benchmarks into ``into``; its short hash."""
    short = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", short, "hydraopt_mobile", "benchmarks"], check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(into, filter="data")
    return short


def run_once(code: Path, shape: str, layers: int, threads: int, out: Path, adapters: Path) -> dict:
    cmd = [sys.executable, str(code / "benchmarks" / SCRIPTS[shape]), "--layers", str(layers), "--threads", str(threads), "--out", str(out)]
    cmd += ["--dense-modules", "0"] if shape == "1b" else ["--adapters", str(adapters)]
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS=str(threads))
    subprocess.run(cmd, check=True, env=env, cwd=code, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def summary(runs: list[dict]) -> dict:
    times = [r["merge_s_three_budgets"] for r in runs]
    return {"merge_s_three_budgets": times, "median_merge_s": statistics.median(times), "peak_rss_mb": [r["peak_rss_mb"] for r in runs], "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs)}


def same_output(base: dict, new: dict) -> dict:
    pairs = list(zip(base["budgets"], new["budgets"]))
    return {
        "same_file_bytes_every_budget": all(b["file_bytes"] == n["file_bytes"] for b, n in pairs),
        "file_bytes": {b["budget"]: [b["file_bytes"], n["file_bytes"]] for b, n in pairs},
        "max_mean_rel_error_difference": max(abs(b["mean_rel_error"] - n["mean_rel_error"]) for b, n in pairs),
    }


def markdown(result: dict) -> str:
    s, base, new = result["setup"], result["base"], result["new"]
    lines = [
        f"# Merge speed side by side: {base['revision']} (base) vs {new['revision']} (new)",
        "",
        f"{s['shapes']}, {s['tasks']} tasks, three budgets, {s['threads']} threads, {s['rounds']} rounds alternating; "
        f"machine: {s['machine_probe']['cpu']} ({s['machine_probe']['isa']}), {s['machine_probe']['matmul_gflops_1_thread']} GFLOPS on one thread.",
        "",
        "| revision | merge s (each run) | median s | median peak RSS MB |",
        "|---|---|---|---|",
    ]
    for side in (base, new):
        lines.append(f"| {side['revision']} | {', '.join(f'{t:.1f}' for t in side['merge_s_three_budgets'])} | {side['median_merge_s']:.1f} | {side['median_peak_rss_mb']:.0f} |")
    lines += [
        "",
        f"Ratio of medians (new / base): **{result['ratio_of_medians']:.3f}**; per round: {', '.join(f'{r:.3f}' for r in result['ratio_per_round'])}.",
        f"Same file bytes at every budget: {result['output']['same_file_bytes_every_budget']}; largest difference of a budget's mean relative error: {result['output']['max_mean_rel_error_difference']:.2e}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision timed as the baseline")
    ap.add_argument("--new", default="HEAD", help="git revision timed against it")
    ap.add_argument("--shape", choices=sorted(SCRIPTS), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="layers of the shape (default: the script's own, 16 for 1b, 32 for 8b)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/merge_speed_side_by_side_SHAPE.json; a .md beside it)")
    ap.add_argument("--keep", type=Path, default=None, help="folder to keep every run's own record in (REVISION_ROUND.json, as the revision's script wrote it)")
    args = ap.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    layers = args.layers or (16 if args.shape == "1b" else 32)
    out = args.out or RESULTS / f"merge_speed_side_by_side_{args.shape}.json"
    adapters = cache_root() / "merge_speed_8b" / f"{TASKS['8b']}x{layers}-r16"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        revision = {label: extract(rev, tmp / label) for label, rev in (("base", args.base), ("new", args.new))}
        runs: dict[str, list[dict]] = {"base": [], "new": []}
        for i in range(args.rounds):
            for label in ("base", "new") if i % 2 == 0 else ("new", "base"):
                record = (args.keep or tmp) / f"{revision[label]}_{i + 1}.json"
                run = run_once(tmp / label, args.shape, layers, args.threads, record, adapters)
                runs[label].append(run)
                print(f"round {i + 1}/{args.rounds} {label} ({revision[label]}): {run['merge_s_three_budgets']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB", file=sys.stderr)
    base, new = summary(runs["base"]), summary(runs["new"])
    result = {
        "setup": {"shape": args.shape, "shapes": runs["new"][0]["setup"]["shapes"], "tasks": TASKS[args.shape], "layers": layers, "threads": args.threads, "rounds": args.rounds, "machine_probe": machine_probe(), "note": "timings on this machine (x86 host), side by side; not phone speed"},
        "load_average_1_5_15": os.getloadavg(),
        "base": {"revision": revision["base"]} | base,
        "new": {"revision": revision["new"]} | new,
        "ratio_of_medians": new["median_merge_s"] / base["median_merge_s"],
        "ratio_per_round": [n / b for n, b in zip(new["merge_s_three_budgets"], base["merge_s_three_budgets"])],
        "output": same_output(runs["base"][0], runs["new"][0]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(result, indent=1) + "\n"), (out.with_suffix(".md"), markdown(result))):
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)
    print(markdown(result))


if __name__ == "__main__":
    main()
