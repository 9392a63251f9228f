"""Does the planner's proxy rank banks the way task scores do? For every bank of the suite frontier
(``frontier.json``, one init), the data-free relative error (recorded at merge time) and the
data-aware one (calibration.py: the same 16 train examples per task that the calibrated points
use) and the mean KL to the adapters on those texts (fidelity.py: what ``hydraopt merge
--calibration`` compares to keep a plan) against the measured average score: Spearman rank
correlations over all banks and over the planner's banks, and the error split by layer type
(q_proj / v_proj) for the banks at 1/T.

    python benchmarks/proxy_check.py [--init shared-seed] [--threads 1]

Banks are rebuilt from their points (merges are deterministic: refactor_check.py); nothing is
evaluated again. Writes ``benchmarks/results/proxy_check.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from scipy.stats import spearmanr

from common import RESULTS_DIR, SUITE_ADAPTERS  # first: it puts this checkout on sys.path

from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.app.frontier import Point, banks_for, load_records
from hydraopt_mobile.calibration import collect, relative_errors
from hydraopt_mobile.fidelity import kl_to_adapters, mean_kl
from hydraopt_mobile.suite.calibration_texts import calibration_texts
from hydraopt_mobile.suite.model import load_base_model
from hydraopt_mobile.suite.tasks import load_suite

from frontier import CALIBRATION_PER_TASK  # the frontier's calibration size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default="shared-seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frontier", type=Path, default=RESULTS_DIR / "frontier.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapters = load_adapter_folders(SUITE_ADAPTERS / args.init)
    records = [r for r in load_records(args.frontier) if r["init"] == args.init and "examples" in r and r["choice"] != "kl"]  # a KL choice's bank is one of the others
    points = [Point(r["method"], r["budget"], None if r["format"] == "auto" else r["format"], r.get("at"), r["calibration"], r["choice"]) for r in records]
    model, tokenizer = load_base_model()
    suite = [t for t in load_suite() if t.name in adapters.task_names]
    texts = calibration_texts(suite, tokenizer, CALIBRATION_PER_TASK)
    cal = collect(model, tokenizer, adapters, texts)
    bank_of = banks_for(adapters, points, lambda: cal)
    rows, banks = [], []
    for r, p in zip(records, points):
        bank = bank_of(p)
        banks.append(bank)
        aware = relative_errors(bank, adapters, cal)
        row = {
            "method": r["method"], "budget": r["budget"], "at": r.get("at"), "format": r["format"], "calibration": r.get("calibration", False),
            "storage_fraction": r["storage_fraction"], "avg_score": r["avg_score"],
            "data_free_error": statistics.fmean(r["rel_errors"].values()), "data_aware_error": statistics.fmean(aware.values()),
        }
        if r["budget"] == round(1 / len(adapters.tasks), 4) and r["method"] in ("hydraopt", "per-task", "compeft"):
            for kind in ("q_proj", "v_proj"):
                mods = [m for m in adapters.module_names if m.endswith(kind)]
                row[f"data_aware_error_{kind}"] = statistics.fmean(relative_errors(bank, adapters, cal, mods).values())
                free = {t: sum(bank.modules[m].task_factors(i).dense().sub(adapters.factors(m)[i].dense()).pow(2).sum().item() for m in mods) / sum(adapters.factors(m)[i].dense().pow(2).sum().item() for m in mods) for i, t in enumerate(adapters.task_names)}
                row[f"data_free_error_{kind}"] = statistics.fmean(v**0.5 for v in free.values())
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row, kl in zip(rows, kl_to_adapters(model, tokenizer, adapters, banks, texts, on_step=lambda done, total: print(f"KL: {done}/{total} tasks", flush=True))):
        row["mean_kl"] = mean_kl(kl)
    planner = [x for x in rows if x["method"] in ("hydraopt", "per-task", "compeft", "none")]

    def rho(subset: list[dict], key: str) -> float:
        return float(spearmanr([x[key] for x in subset], [-x["avg_score"] for x in subset]).statistic)

    summary = {
        "init": args.init,
        "calibration_tokens": sum(cal.tokens.values()),
        "spearman_error_vs_score_drop": {
            "all banks": {"data_free": rho(rows, "data_free_error"), "data_aware": rho(rows, "data_aware_error"), "kl": rho(rows, "mean_kl"), "n": len(rows)},
            "planner banks and references": {"data_free": rho(planner, "data_free_error"), "data_aware": rho(planner, "data_aware_error"), "kl": rho(planner, "mean_kl"), "n": len(planner)},
        },
        "rows": rows,
    }
    (RESULTS_DIR / "proxy_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"# Proxy check ({args.init}): reconstruction error vs measured score",
        "",
        "Spearman rank correlation between each bank's mean relative error (or its mean KL to the adapters on the calibration texts) and its score drop (1 = it orders banks exactly as the scores do).",
        "",
        "| banks | n | data-free error | data-aware error | KL |",
        "|---|---|---|---|---|",
    ]
    for name, v in summary["spearman_error_vs_score_drop"].items():
        lines.append(f"| {name} | {v['n']} | {v['data_free']:.3f} | {v['data_aware']:.3f} | {v['kl']:.3f} |")
    lines += ["", "| method | budget | format | storage | score | data-free error | data-aware error | KL | q / v data-free | q / v data-aware |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in sorted(rows, key=lambda x: (x["method"], x["storage_fraction"])):
        budget = f"at {x['at']}" if x["at"] else "-" if x["budget"] is None else f"{x['budget']:g}"
        qv = lambda k: f"{x[k + '_q_proj']:.3f} / {x[k + '_v_proj']:.3f}" if k + "_q_proj" in x else ""  # noqa: E731
        lines.append(f"| {x['method']}{' (calibrated)' if x['calibration'] else ''} | {budget} | {x['format']} | {x['storage_fraction']:.4f} | {x['avg_score']:.2f} | {x['data_free_error']:.3f} | {x['data_aware_error']:.3f} | {x['mean_kl']:.4f} | {qv('data_free_error')} | {qv('data_aware_error')} |")
    (RESULTS_DIR / "proxy_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
