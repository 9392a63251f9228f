"""Did the fast merge change any bank beyond floating-point noise? Old and new code side by side.

The merge's arithmetic was reorganised for speed (QR kept as reflectors, top-k eigensolvers, group
solutions mapped from the tasks' own A's, batched traces), so bank bytes may differ by rounding
(and an int4 code can flip at a rounding boundary): refactor_check.py's byte fingerprints then
change. This script measures what matters instead, on the same banks refactor_check.py covers
(every registry method on planted adapters at three budgets, and every data-free point of the
frontier on the embedded shared-seed adapters) plus the frontier's calibrated points (the suite's
calibration pass on SmolLM2, run by each revision's own code): per bank, whether every module
chose the same layout (k_A, k_B, rank, format), whether the tensor files are byte-identical, and
the largest difference of any module's per-task relative error ``||dW - dW^|| / ||dW||``. Both
revisions' code (``--base`` and HEAD, not the working tree) is extracted with ``git archive`` into a
temporary folder and run in a child process (this script puts neither checkout on ``sys.path`` itself: ``PYTHONPATH`` chooses).

The data-aware ALS of the calibrated points (no closed form; CG A-steps) is more sensitive to float
rounding than the data-free closed forms, so their banks are also compared with their data-aware
per-task errors, and the base's calibrated points are run a second time at ``--control-threads``
torch threads (other BLAS reduction orders): how far rounding alone moves the base's own banks.

    python benchmarks/speed_equivalence.py [--base main] [--no-calibrated] [--control-threads 2] [--out benchmarks/results/speed_equivalence.json]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def suite_calibration(adapters):
    """The frontier's calibration (benchmarks/frontier.py): 16 train examples per task through SmolLM2."""
    from hydraopt_mobile.calibration import collect
    from hydraopt_mobile.suite.calibration_texts import calibration_texts
    from hydraopt_mobile.suite.model import load_base_model
    from hydraopt_mobile.suite.tasks import load_suite

    model, tokenizer = load_base_model()
    return collect(model, tokenizer, adapters, calibration_texts([t for t in load_suite() if t.name in adapters.task_names], tokenizer, 16))


def dump(out: Path, calibrated: bool, threads: int, only_calibrated: bool) -> None:
    """Run with whichever hydraopt_mobile is on the path: per bank, plan, file hashes, errors
    (for a calibrated bank also the data-aware ones, calibration.relative_errors)."""
    import torch

    from hydraopt_mobile.adapters import build_adapter_set, load_adapter
    from hydraopt_mobile.app.frontier import banks_for, default_points
    from hydraopt_mobile.calibration import relative_errors
    from hydraopt_mobile.factored import factored_sq_error, sq_norm
    from hydraopt_mobile.merge.budget import InfeasibleBudget

    torch.set_num_threads(threads)

    def describe(bank, adapters, calibration=None) -> dict:
        if isinstance(bank, InfeasibleBudget):
            return {"infeasible": True}
        h = hashlib.sha256()
        for file, tensors, _ in sorted(bank.packed(), key=lambda x: x[0]):
            for key in sorted(tensors):
                h.update(f"{file}/{key}".encode())
                h.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
        plan, errors = {}, {}
        for name, m in bank.modules.items():
            plan[name] = [len(m.A), len(m.B), m.rank, m.fmt.label() if m.A else "-"]
            targets = adapters.factors(name)
            errors[name] = [(factored_sq_error(f, m.task_factors(t)) / max(sq_norm(f), 1e-30)) ** 0.5 for t, f in enumerate(targets)]
        out = {"tensors_sha": h.hexdigest(), "plan": plan, "module_rel_errors": errors, "rel_errors": bank.rel_errors}
        return out if calibration is None else out | {"aware_rel_errors": relative_errors(bank, adapters, calibration)}

    import hydraopt_mobile.synthetic  # noqa: F401  (loaded from the code under test, before refactor_check)

    # refactor_check puts this checkout first on sys.path; the modules it needs are loaded above
    # from whichever code this run is for, and the path is restored for anything loaded later
    from refactor_check import planted_banks

    sys.path[:] = [p for p in sys.path if p != str(ROOT)]

    result: dict = {}
    if not only_calibrated:
        with tempfile.TemporaryDirectory() as d:
            for label, bank, adapters in planted_banks(Path(d)):
                result[f"planted/{label}"] = describe(bank, adapters)
    suite = ROOT / "hydraopt_mobile" / "suite" / "adapters" / "shared-seed"
    adapters = build_adapter_set([load_adapter(p) for p in sorted(suite.iterdir()) if (p / "adapter_config.json").exists()])
    points = [p for p in default_points(len(adapters.tasks)) if (calibrated or not p.calibration) and (p.calibration or not only_calibrated)
              and p.choice != "kl"]  # a KL choice keeps one of the two plans measured here
    calibrate = functools.cache(lambda: suite_calibration(adapters))
    get = banks_for(adapters, points, calibrate=calibrate)
    for p in points:
        result["frontier/" + "/".join(str(x) for x in p.key("shared-seed"))] = describe(get(p), adapters, calibrate() if p.calibration else None)
    out.write_text(json.dumps(result))


def compare(old: dict, new: dict) -> dict:
    banks = {}
    for key in old:
        a, b = old[key], new.get(key, {})
        if a.get("infeasible") or b.get("infeasible"):
            banks[key] = {"both_infeasible": bool(a.get("infeasible") and b.get("infeasible"))}
            continue
        diffs = [abs(x - y) for m in a["module_rel_errors"] for x, y in zip(a["module_rel_errors"][m], b["module_rel_errors"][m])]
        if "aware_rel_errors" in a:
            banks[key] = {"max_task_aware_rel_error_diff": max(abs(a["aware_rel_errors"][t] - b["aware_rel_errors"][t]) for t in a["aware_rel_errors"])}
        banks[key] = banks.get(key, {}) | {
            "same_plan": a["plan"] == b["plan"],
            "same_tensor_bytes": a["tensors_sha"] == b["tensors_sha"],
            "max_module_rel_error_diff": max(diffs, default=0.0),
            "max_task_rel_error_diff": max(abs(a["rel_errors"][t] - b["rel_errors"][t]) for t in a["rel_errors"]),
            "modules_with_another_plan": sorted(m for m in a["plan"] if a["plan"][m] != b["plan"][m]),
        }
    feasible = [v for v in banks.values() if "same_plan" in v]
    return {
        "banks": len(banks),
        "infeasible_in_both": sum(1 for v in banks.values() if v.get("both_infeasible")),
        "same_plan": sum(v["same_plan"] for v in feasible),
        "same_tensor_bytes": sum(v["same_tensor_bytes"] for v in feasible),
        "max_module_rel_error_diff": max((v["max_module_rel_error_diff"] for v in feasible), default=0.0),
        "max_task_rel_error_diff": max((v["max_task_rel_error_diff"] for v in feasible), default=0.0),
        "max_task_aware_rel_error_diff": max((v["max_task_aware_rel_error_diff"] for v in feasible if "max_task_aware_rel_error_diff" in v), default=None),
        "per_bank": banks,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="main", help="git revision to compare with")
    ap.add_argument("--no-calibrated", dest="calibrated", action="store_false", help="leave out the calibrated frontier points (each revision runs the calibration pass)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed_equivalence.json")
    ap.add_argument("--control-threads", type=int, default=2, help="also run the base's calibrated points with this many torch threads (0: not): how far float rounding alone moves them")
    ap.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--only-calibrated", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dump:
        dump(args.dump, args.calibrated, args.threads, args.only_calibrated)
        return
    # both sides from commits, extracted now: edits made while this runs (it takes minutes) cannot leak into either
    revision = [subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True, capture_output=True, text=True).stdout.strip() for rev in (args.base, "HEAD")]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for label, rev in zip(("base", "new"), revision):
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "hydraopt_mobile"], check=True, capture_output=True).stdout
            tarfile.open(fileobj=io.BytesIO(archive)).extractall(tmp / label, filter="data")
        runs = {}
        jobs = [("base", tmp / "base", 1, []), ("new", tmp / "new", 1, [])]
        if args.calibrated and args.control_threads:
            jobs.append(("control", tmp / "base", args.control_threads, ["--only-calibrated"]))
        for label, code, threads, extra in jobs:
            env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS=str(threads))
            flags = ["--threads", str(threads)] + ([] if args.calibrated else ["--no-calibrated"]) + extra
            subprocess.run([sys.executable, __file__, "--dump", str(tmp / f"{label}.json")] + flags, check=True, env=env, cwd=code)
            runs[label] = json.loads((tmp / f"{label}.json").read_text())
    result = {"base": revision[0], "new": revision[1], "calibrated_points": args.calibrated} | compare(runs["base"], runs["new"])
    if "control" in runs:  # the base against itself at another thread count: rounding alone
        result["control_base_at_threads"] = {"threads": args.control_threads} | compare({k: runs["base"][k] for k in runs["control"]}, runs["control"])
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_bank"}, indent=1))


if __name__ == "__main__":
    main()
