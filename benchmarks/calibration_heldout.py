"""Does the data-aware objective generalise beyond its calibration texts, does it rank banks as
their scores do, and does the KL choice (``hydraopt merge --calibration``, objective_choice.py) pick
the same plan on texts it has not seen?

For each init, HydraOpt and per-task compression at 1/(2T) and 1/T, each with the frontier's
calibration (the first 16 train examples per task) and data-free: the banks frontier.py scores.
Each bank's objective (the mean over tasks of the squared relative error, the planner's weighted
sum) is measured four ways: on the moments it was fitted to (``fit``), on held-out train examples
16-63 (``heldout``), on the validation split's 30 (``val``), and data-free (``data_free``). The
test score is the frontier's record of the same bank: its file bytes and every task's data-free
relative error must match (to 1e-6), else the score is left out (another CPU's rounding can give
another bank of the same bytes). Each bank's mean KL to the adapters (fidelity.py) is measured on the
calibration texts (``kl_fit``: what the KL choice compares) and on as many held-out train examples
per task (``kl_heldout``, examples 16-31); the second table says, per init, budget and method, which
plan each KL keeps (the data-aware or the data-free one) and whether they agree.

    python benchmarks/calibration_heldout.py [--init shared-seed] [--init independent-seeds] [--adapters ROOT ...]
    python benchmarks/calibration_heldout.py --report     # the .md from the .json

Run it with the frontier's thread count (1, the default) on the machine type the frontier's records
come from: with 2 threads every calibrated bank came out another bank than the frontier's 1-thread
one (the calibration pass runs the base model, whose reductions round differently on another thread
count or CPU), while the data-free banks were the same (the merge gives the same bytes on any thread
count).

Writes benchmarks/results/calibration_heldout.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from common import RESULTS_DIR, SUITE_ADAPTERS, adapter_digests, is_record_of  # first: it puts this checkout on sys.path

from frontier import CALIBRATION_PER_TASK, INITS
from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.calibration import collect, relative_errors
from hydraopt_mobile.fidelity import kl_to_adapters, mean_kl
from hydraopt_mobile.objective_choice import kept_objective
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.sharing import layout_summary
from hydraopt_mobile.suite.model import load_base_model
from hydraopt_mobile.suite.calibration_texts import calibration_texts, training_sequence
from hydraopt_mobile.suite.tasks import load_suite

HELDOUT = slice(CALIBRATION_PER_TASK, 64)  # train examples the calibration does not use
KL_HELDOUT = slice(CALIBRATION_PER_TASK, 2 * CALIBRATION_PER_TASK)  # as many as the KL choice sees


def mean_sq(errors: dict[str, float]) -> float:
    return sum(e * e for e in errors.values()) / len(errors)


def frontier_score(frontier: list[dict], init: str, method: str, budget: float, calibrated: bool, bank) -> float | None:
    """The frontier's test score of this bank, or None when its record is of another bank."""
    rec = next((r for r in frontier if (r["init"], r["method"], r["budget"], r.get("calibration", False), r["format"]) == (init, method, budget, calibrated, "auto") and r.get("at") is None), None)
    return rec["avg_score"] if is_record_of(rec, bank) else None


def markdown(data: dict) -> str:
    lines = ["# The data-aware objective on held-out inputs, and the banks' scores", "",
             "Objective: mean over tasks of the squared relative error (the planner's weighted sum), measured on the moments the bank was fitted to "
             f"(first {CALIBRATION_PER_TASK} train examples per task), on held-out train examples {HELDOUT.start}-{HELDOUT.stop - 1}, on the validation split, and data-free. "
             "Score: the frontier's test score of the same bank (frontier.json); *another bank*: this run's bank is not the frontier's "
             "(other file bytes or per-task errors: another CPU type or thread count rounds the calibration pass otherwise).", "",
             f"{data['meta']['machine']}, torch {data['meta']['torch']}, {data['meta']['threads']} thread(s), {data['meta']['seconds']:.0f} s.", ""]
    rows = [[r["init"], f"{r['budget']:.4f}", r["method"], "yes" if r["calibrated"] else "no", r["modules_sharing"],
             f"{r['objective_fit']:.5f}", f"{r['objective_heldout']:.5f}", f"{r['objective_val']:.5f}", f"{r['objective_data_free']:.5f}",
             "another bank" if r["test_score"] is None else f"{r['test_score']:.2f}"] for r in data["records"]]
    lines += markdown_table(["init", "budget", "method", "calibrated", "modules sharing", "fit", "held-out", "val", "data-free", "test score"], rows, align="llllrrrrrr")
    lines += ["", "## The KL choice on held-out texts", "",
              f"Mean KL to the adapters on the calibration texts (train 0-{CALIBRATION_PER_TASK - 1} per task, what `hydraopt merge --calibration` compares) and on held-out train examples "
              f"{KL_HELDOUT.start}-{KL_HELDOUT.stop - 1}; the plan each keeps (the lower KL; a tie keeps data-free).", ""]
    lines += markdown_table(["init", "budget", "method", "KL data-aware (fit / held-out)", "KL data-free (fit / held-out)", "kept on fit", "kept on held-out", "same"],
                            [[c["init"], f"{c['budget']:.4f}", c["method"], f"{c['kl_fit']['data-aware']:.4f} / {c['kl_heldout']['data-aware']:.4f}",
                              f"{c['kl_fit']['data-free']:.4f} / {c['kl_heldout']['data-free']:.4f}", c["kept_fit"], c["kept_heldout"], "yes" if c["kept_fit"] == c["kept_heldout"] else "**no**"]
                             for c in kl_choices(data["records"])], align="lllrrlll")
    return "\n".join(lines) + "\n"


def kl_choices(records: list[dict]) -> list[dict]:
    """Per (init, budget, method): the calibrated and the data-free bank's KL on both text sets, and the plan each set keeps."""
    out = []
    for aware in (r for r in records if r["calibrated"]):
        free = next(r for r in records if (r["init"], r["budget"], r["method"], r["calibrated"]) == (aware["init"], aware["budget"], aware["method"], False))
        kl = {key: {"data-aware": aware[key], "data-free": free[key]} for key in ("kl_fit", "kl_heldout")}
        kept = {key: kept_objective(v) for key, v in kl.items()}
        out.append({"init": aware["init"], "budget": aware["budget"], "method": aware["method"], **kl, "kept_fit": kept["kl_fit"], "kept_heldout": kept["kl_heldout"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", action="append", choices=INITS)
    ap.add_argument("--adapters", type=Path, action="append", help="folder holding <init>/<task>/ PEFT adapters; repeat for several (each init from the first that has it; default: the committed ones)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "calibration_heldout.json")
    ap.add_argument("--report", action="store_true", help="only rewrite the .md beside --out from it")
    args = ap.parse_args()
    if args.report:
        data = json.loads(args.out.read_text())
        write_record(args.out, data, markdown(data))
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_base_model()
    tasks = load_suite()
    frontier = json.loads((RESULTS_DIR / "frontier.json").read_text())["records"]
    records, digests = [], {}
    for init in args.init or INITS:
        folder = next((r / init for r in args.adapters or [SUITE_ADAPTERS] if (r / init).is_dir()), None)
        if folder is None:
            raise SystemExit(f"no {init} adapters under {[str(r) for r in args.adapters or [SUITE_ADAPTERS]]}: pass --adapters ROOT")
        adapters = load_adapter_folders(folder)
        digests[init] = adapter_digests(folder)
        suite = [t for t in tasks if t.name in adapters.task_names]

        heldout_texts = {t.name: [training_sequence(tokenizer, t, ex) for ex in t.train[HELDOUT]] for t in suite}
        val_texts = {t.name: [training_sequence(tokenizer, t, ex) for ex in t.val] for t in suite}
        fit_texts = calibration_texts(suite, tokenizer, CALIBRATION_PER_TASK)
        kl_texts = {t.name: [training_sequence(tokenizer, t, ex) for ex in t.train[KL_HELDOUT]] for t in suite}
        fit, heldout, val = (collect(model, tokenizer, adapters, texts) for texts in (fit_texts, heldout_texts, val_texts))
        T = len(adapters.tasks)
        banks, first = [], len(records)
        for budget in (round(0.5 / T, 4), round(1.0 / T, 4)):
            for method in ("hydraopt", "per-task"):
                for calibration in (fit, None):
                    bank = merge(adapters, MergeConfig(method, budget=Budget(fraction=budget), calibration=calibration))
                    banks.append(bank)
                    sharing = layout_summary(bank)["sharing"]
                    records.append({
                        "init": init, "budget": budget, "method": method, "calibrated": calibration is not None,
                        "modules_sharing": sum(n for kind, n in sharing.items() if kind != "no sharing"), "file_bytes": bank.total_file_bytes(),
                        "objective_fit": mean_sq(relative_errors(bank, adapters, fit)), "objective_heldout": mean_sq(relative_errors(bank, adapters, heldout)),
                        "objective_val": mean_sq(relative_errors(bank, adapters, val)), "objective_data_free": mean_sq(bank.rel_errors),
                        "rel_errors": bank.rel_errors,
                        "test_score": frontier_score(frontier, init, method, budget, calibration is not None, bank),
                    })
                    print(json.dumps(records[-1]), flush=True)
        for key, texts in (("kl_fit", fit_texts), ("kl_heldout", kl_texts)):
            for record, kl in zip(records[first:], kl_to_adapters(model, tokenizer, adapters, banks, texts)):
                record[key] = mean_kl(kl)
                record[key + "_per_task"] = kl
            print(f"{init}: {key} done", flush=True)
    meta = {"machine": platform.machine(), "torch": torch.__version__, "threads": args.threads, "seconds": time.perf_counter() - t0,
            "calibration": f"fit: train examples 0-{CALIBRATION_PER_TASK - 1} per task (the frontier's); held-out: train {HELDOUT.start}-{HELDOUT.stop - 1}; val: the validation split; KL held-out: train {KL_HELDOUT.start}-{KL_HELDOUT.stop - 1}",
            "adapters_sha256": digests}
    data = {"meta": meta, "records": records}
    write_record(args.out, data, markdown(data))


if __name__ == "__main__":
    main()
