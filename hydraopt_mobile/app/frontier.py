"""The storage-accuracy frontier: merge the suite's adapters with every method and score the results.

One record per (method, budget, format, init). Storage is file bytes (storage.py): every tensor file
of the bundle over the same adapters stored as they are in fp16, so a quantisation saving shows up
on the one-adapter-per-task rows (``none`` in int8 / int4) and is never credited to merging. Per-task
compression (``per-task``: the planner restricted to one factor pair per task) runs at the same
budgets as HydraOpt, and both run at exactly the file bytes of the baselines' one merged adapter in
each format, so every comparison is at equal bytes. Drops are against one-adapter-per-task fp16 with
a 95 % paired bootstrap interval over the same examples. Records are appended as they are measured,
so a long run can be resumed and a partial run still leaves its numbers.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hydraopt_mobile.adapters import AdapterSet
from hydraopt_mobile.app.progress import progress_bar
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.calibration import Calibration
from hydraopt_mobile.formats import NumberFormat
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.registry import METHODS, MergeConfig, merge, merge_budgets
from hydraopt_mobile.plotting import figure
from hydraopt_mobile.sharing import NO_SHARING, layout_summary, plan_label, saving_breakdown
from hydraopt_mobile.suite.metrics import paired_drop

from .records import markdown_table, write_record

SCHEMA = 2  # records of schema 1 (payload bytes) are not comparable and are dropped on resume
BASELINES = ("svd", "ties", "task-arithmetic", "dare-ties", "knots")
FORMATS = ("fp16", "int8", "int4")
BUDGETED = tuple(m.name for m in METHODS.values() if m.budgeted)  # hydraopt, per-task, compeft
PLANNED = ("hydraopt", "per-task")  # the planner's methods: every budget, and with calibration
PER_TASK_RIVALS = ("per-task", "compeft")  # compressing each adapter on its own: what sharing must beat


@dataclass(frozen=True)
class Point:
    """One point to measure: a method, its number format (None: the planner's choice) and, for a
    budgeted method, a budget: a fraction of the reference, or ``at`` the file bytes of the
    baselines' one merged adapter in that format."""

    method: str
    budget: float | None = None
    fmt: str | None = None
    at: str | None = None
    calibration: bool = False  # the data-aware objective (suite calibration texts)
    choice: str | None = None  # with calibration: "data-aware" (that objective's plan) or "kl" (objective_choice.py)

    def key(self, init: str) -> tuple:
        return (self.method, self.budget, self.fmt or "auto", self.at, init, self.calibration, self.choice)


def default_points(n_tasks: int) -> list[Point]:
    """Ordered by importance, so that a run cut short still has the references, the budgeted
    methods at 1/T and 1/(2T) (the planner's with and without calibration), and the fp16 baselines."""
    one_adapter, half = round(1.0 / n_tasks, 4), round(0.5 / n_tasks, 4)
    points = [Point("none", fmt=f) for f in FORMATS]
    points += [Point(m, one_adapter) for m in BUDGETED]
    points += [Point(m, b, calibration=True, choice="data-aware") for b in (one_adapter, half) for m in PLANNED]
    points += [Point(m, b, calibration=True, choice="kl") for b in (one_adapter, half) for m in PLANNED]
    points += [Point("compeft", half)]
    points += [Point(b, fmt="fp16") for b in BASELINES]
    points += [Point(m, at=f) for f in ("int4", "int8", "fp16") for m in PLANNED]
    points += [Point(m, b) for b in (half, 0.15, 0.3, 0.52) for m in PLANNED]
    points += [Point(b, fmt=f) for f in ("int4", "int8") for b in BASELINES]
    return points


def baseline_bytes(adapters: AdapterSet, fmt: str) -> int:
    """File bytes of one merged adapter (every baseline stores one, rank r) in ``fmt``."""
    return merge(adapters, MergeConfig("svd", fmt=NumberFormat.parse(fmt))).total_file_bytes()


def budget_of(adapters: AdapterSet, point: Point) -> Budget:
    return Budget(nbytes=baseline_bytes(adapters, point.at)) if point.at else Budget(fraction=point.budget)


ChooseBanks = Callable[[MergeConfig, list[Budget], Callable[[int, int], None]], list[MergedBank | InfeasibleBudget]]
"""``choose(config, budgets, on_step)``: the banks of a calibrated config chosen by KL (objective_choice.merge_choosing with the model and texts bound)."""


def banks_for(adapters: AdapterSet, points: list[Point], calibrate: Callable[[], Calibration] | None = None, choose: ChooseBanks | None = None) -> Callable[[Point], MergedBank | InfeasibleBudget]:
    """A lookup that merges lazily: the budgeted points of one (method, format, calibration, choice)
    share one pass over the planner's candidates; fixed-storage methods merge per point.
    ``calibrate()`` gives the calibration of the points that ask for it, ``choose`` the banks of
    the points that choose their objective by KL."""
    cache: dict[Point, MergedBank | InfeasibleBudget] = {}

    def get(point: Point) -> MergedBank | InfeasibleBudget:
        if point not in cache:
            fmt = NumberFormat.parse(point.fmt) if point.fmt else None
            if point.method in BUDGETED:
                same = [p for p in points if (p.method, p.fmt, p.calibration, p.choice) == (point.method, point.fmt, point.calibration, point.choice)]
                if point.calibration and calibrate is None:
                    raise ValueError(f"{point}: needs calibration, none given")
                if point.choice == "kl" and choose is None:
                    raise ValueError(f"{point}: needs the model and texts to choose by KL, none given")
                config = MergeConfig(point.method, fmt=fmt, calibration=calibrate() if point.calibration and calibrate else None)
                budgets = [budget_of(adapters, p) for p in same]
                with progress_bar(f"{point.method}: modules") as on_step:
                    banks = choose(config, budgets, on_step) if point.choice == "kl" and choose else merge_budgets(adapters, config, budgets, on_step, strict=False)
                cache.update(zip(same, banks))
            else:
                cache[point] = merge(adapters, MergeConfig(point.method, fmt=fmt or NumberFormat("fp16")))
        return cache[point]

    return get


def record(point: Point, init: str, bank: MergedBank, examples: dict[str, list[float]], reference: dict[str, list[float]] | None, seconds: float) -> dict:
    scores = {t: statistics.fmean(v) for t, v in examples.items()}
    drop = paired_drop(reference, examples) if reference else paired_drop(examples, examples)
    return {
        "method": point.method,
        "budget": point.budget,
        "at": point.at,
        "format": point.fmt or "auto",
        "init": init,
        "calibration": point.calibration,
        "choice": point.choice,
        **({"kept_objective": bank.params["choice"]["kept"], "mean_kl": bank.params["choice"]["mean_kl"]} if "choice" in bank.params else {}),
        "plan": plan_label(bank),
        "file_bytes": bank.total_file_bytes(),
        "reference_file_bytes": bank.reference_file_bytes,
        "storage_fraction": bank.storage_fraction(),
        "payload_bytes": bank.payload_bytes(),
        "avg_score": statistics.fmean(scores.values()),
        **drop,
        "scores": scores,
        "examples": {t: [round(x, 2) for x in v] for t, v in examples.items()},
        "layout_summary": layout_summary(bank),
        "saving": saving_breakdown(bank),
        "rel_errors": bank.rel_errors,
        "eval_seconds": seconds,
    }


def infeasible_record(point: Point, init: str, error: InfeasibleBudget) -> dict:
    return {"method": point.method, "budget": point.budget, "at": point.at, "format": point.fmt or "auto", "init": init, "calibration": point.calibration, "choice": point.choice, "infeasible": str(error)}


def record_key(r: dict) -> tuple:
    return (r["method"], r["budget"], r["format"], r.get("at"), r["init"], r["calibration"], r.get("choice"))


def mode(r: dict) -> str:
    """How a record's bank was planned: data-free, calibrated (the data-aware plan), or calibrated with the plan chosen by KL."""
    return "calibrated, KL choice" if r.get("choice") == "kl" else "calibrated" if r.get("calibration") else "data-free"


def load_records(path: Path) -> list[dict]:
    """``path``'s records, each with ``calibration`` (records written before the field existed were
    all measured data-free: it came with the data-aware objective) and ``choice`` (calibrated
    records written before it existed kept the data-aware plan)."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    records = data["records"] if data.get("meta", {}).get("schema") == SCHEMA else []
    records = [r if "calibration" in r else r | {"calibration": False} for r in records]
    return [r if "choice" in r else r | {"choice": "data-aware" if r["calibration"] else None} for r in records]


def save_records(path: Path, records: list[dict], meta: dict) -> None:
    write_record(path, {"meta": meta | {"schema": SCHEMA}, "records": records})


def run_frontier(adapters: AdapterSet, init: str, points: list[Point], evaluate_bank: Callable[[MergedBank], dict[str, list[float]]], out: Path, meta: dict, on_record: Callable[[dict], None] | None = None, calibrate: Callable[[], Calibration] | None = None, choose: ChooseBanks | None = None) -> list[dict]:
    """Measure every point not yet in ``out`` (resumable); ``evaluate_bank(bank) -> task -> per-example scores``."""
    records = load_records(out)
    done = {record_key(r) for r in records}
    todo = [p for p in points if p.key(init) not in done]
    ref = next((r for r in records if (r["method"], r["format"], r["init"]) == ("none", "fp16", init)), None)
    reference = ref["examples"] if ref else None
    bank_of = banks_for(adapters, todo, calibrate, choose)
    for point in todo:
        bank = bank_of(point)
        if isinstance(bank, InfeasibleBudget):
            records.append(infeasible_record(point, init, bank))
        else:
            t0 = time.perf_counter()
            examples = evaluate_bank(bank)
            if (point.method, point.fmt) == ("none", "fp16"):
                reference = examples
            records.append(record(point, init, bank, examples, reference, time.perf_counter() - t0))
        save_records(out, records, meta)
        if on_record:
            on_record(records[-1])
    return records


def sharing_verdicts(records: list[dict]) -> list[dict]:
    """Per init and budget: HydraOpt against each way of compressing every adapter on its own
    (per-task compression with the same objective, ComPEFT) at the same budget (same bytes within
    the planner's rounding), as a paired difference over the same examples; where the rival cannot
    reach the bytes at all, that is the verdict."""
    out = []
    for h in (r for r in records if r["method"] == "hydraopt" and r["format"] == "auto" and "examples" in r):
        calibrated = h.get("calibration", False)
        for rival in PER_TASK_RIVALS:
            want = (rival, h["budget"], "auto", h.get("at"), h["init"], *((calibrated, h.get("choice")) if rival == "per-task" else (False, None)))
            p = next((r for r in records if record_key(r) == want), None)
            if p is None:
                continue
            row = {
                "init": h["init"],
                "budget": h["budget"] if h["budget"] is not None else f"at {h['at']} baseline bytes",
                "calibration": calibrated,
                "mode": mode(h),
                "rival": rival + (f" ({mode(h)})" if rival == "per-task" and calibrated else ""),
                "hydraopt_fraction": h["storage_fraction"],
                "hydraopt_score": h["avg_score"],
                "hydraopt_shares": h["layout_summary"]["sharing"],
            }
            if "infeasible" in p:
                out.append(row | {"rival_fraction": None, "rival_score": None, "hydraopt_minus_rival": None, "ci95": None, "verdict": "only sharing fits: " + p["infeasible"].split(": ", 1)[-1]})
                continue
            diff = paired_drop(p["examples"], h["examples"])  # positive: hydraopt below the rival
            low, high = diff["drop_points_ci95"]
            if h["plan"] == NO_SHARING and h["examples"] == p["examples"]:
                verdict = "same answers: HydraOpt's plan shares nothing here"
            else:
                verdict = "HydraOpt ahead" if high < 0 else f"{rival} ahead" if low > 0 else "no clear difference"
            out.append(row | {
                "rival_fraction": p["storage_fraction"],
                "rival_score": p["avg_score"],
                "hydraopt_minus_rival": 0.0 - diff["drop_points"],
                "ci95": [0.0 - high, 0.0 - low],
                "verdict": verdict,
            })
    return sorted(out, key=lambda v: (v["init"], v["hydraopt_fraction"], v["mode"], v["rival"]))


def calibration_gains(records: list[dict]) -> list[dict]:
    """Per init, method and budget: the calibrated bank against the data-free one, paired over the same examples."""
    out = []
    for c in (r for r in records if r.get("calibration") and "examples" in r):
        free = next((r for r in records if "examples" in r and not r.get("calibration") and record_key(r)[:5] == record_key(c)[:5]), None)
        if free is not None:
            diff = paired_drop(free["examples"], c["examples"])  # positive: calibrated below data-free
            low, high = diff["drop_points_ci95"]
            out.append({"init": c["init"], "method": c["method"], "budget": c["budget"], "mode": mode(c), "kept": c.get("kept_objective"),
                        "data_free": free["avg_score"], "calibrated": c["avg_score"], "gain": 0.0 - diff["drop_points"], "ci95": [0.0 - high, 0.0 - low]})
    return sorted(out, key=lambda g: (g["init"], g["method"], g["budget"], g["mode"]))


def _ci(pair: list[float]) -> str:
    return f"[{pair[0]:+.1f}, {pair[1]:+.1f}]"


def _budget_cell(r: dict) -> str:
    return f"at {r['at']} baseline" if r.get("at") else "-" if r["budget"] is None else f"{r['budget']:g}"


def _point_row(r: dict) -> list[str]:
    head = [r["init"], r["method"] + ("" if not r.get("calibration") else f" ({mode(r)}: kept {r['kept_objective']})" if r.get("kept_objective") else f" ({mode(r)})"), _budget_cell(r), r["format"]]
    if "infeasible" in r:
        return head + ["infeasible"] + [""] * 5
    return head + [r["plan"], f"{r['storage_fraction']:.4f}", f"{r['avg_score']:.2f}", f"{r['drop_points']:+.2f}", f"{r['rel_drop_pct']:+.2f}", _ci(r["rel_drop_pct_ci95"])]


def _verdict_row(v: dict) -> list[str]:
    budget = v["budget"] if isinstance(v["budget"], str) else f"{v['budget']:g}"
    shared = ", ".join(f"{k} x{n}" for k, n in v["hydraopt_shares"].items())
    head = [v["init"], budget, v["mode"], v["rival"]]
    if v["rival_score"] is None:
        return head + [f"{v['hydraopt_fraction']:.4f} / -", f"{v['hydraopt_score']:.2f}", "-", "", "", v["verdict"], shared]
    return head + [f"{v['hydraopt_fraction']:.4f} / {v['rival_fraction']:.4f}", f"{v['hydraopt_score']:.2f}", f"{v['rival_score']:.2f}",
                   f"{v['hydraopt_minus_rival']:+.2f}", _ci(v["ci95"]), v["verdict"], shared]


def frontier_markdown(records: list[dict]) -> str:
    """frontier.md: every point, then HydraOpt against each per-task rival at equal bytes."""
    order = {"none": 0, "hydraopt": 1, "per-task": 2, "compeft": 3}
    points = sorted(records, key=lambda r: (r["init"], order.get(r["method"], 4), r["method"], mode(r), r.get("storage_fraction", 0)))
    lines = [
        "Storage is file bytes of every tensor file over the same adapters stored as they are in fp16 (one safetensors file per task).",
        "Drops are against one-adapter-per-task fp16 on the same test examples, with 95 % paired bootstrap intervals.",
        "",
        *markdown_table(["init", "method", "budget", "format", "plan", "storage", "avg score", "drop (pts)", "drop (%)", "95 % CI (%)"], map(_point_row, points)),
    ]
    verdicts = sharing_verdicts(records)
    if verdicts:
        lines += [
            "",
            "## Does sharing beat compressing each adapter on its own, at equal bytes?",
            "",
            *markdown_table(["init", "budget", "hydraopt", "rival", "storage hydraopt / rival", "hydraopt score", "rival score", "difference (pts)", "95 % CI", "verdict", "what hydraopt shared"], map(_verdict_row, verdicts)),
        ]
    gains = calibration_gains(records)
    if gains:
        rows = ([g["init"], g["method"], f"{g['budget']:g}", g["mode"] + (f" (kept {g['kept']})" if g["kept"] else ""), f"{g['data_free']:.2f}", f"{g['calibrated']:.2f}", f"{g['gain']:+.2f}", _ci(g["ci95"])] for g in gains)
        lines += ["", "## What calibration changed (same method and budget, paired)", "",
                  "*calibrated*: the data-aware objective's plan; *calibrated, KL choice*: of that plan and the data-free one, the bank closer to the adapters on the calibration texts (`hydraopt merge --calibration --choose kl`; the default keeps the data-aware plan).", "",
                  *markdown_table(["init", "method", "budget", "calibration", "data-free", "calibrated", "gain (pts)", "95 % CI"], rows)]
    return "\n".join(lines) + "\n"


def plot_frontier(records: list[dict], png: Path, base_scores: dict[str, float] | None = None) -> None:
    """Storage (x, file bytes) against average score (y), one panel per init: HydraOpt and per-task
    compression as curves, the baselines and one-adapter-per-task formats as points."""
    from matplotlib.ticker import NullFormatter

    measured = [r for r in records if "examples" in r]
    inits = sorted({r["init"] for r in measured})
    with figure(png, len(inits), figsize=(7 * len(inits), 5), dpi=120, squeeze=False) as (_, axes):
        markers = {"fp16": "o", "int8": "s", "int4": "^", "auto": "D"}
        for ax, init in zip(axes[0], inits):
            rows = [r for r in measured if r["init"] == init]
            ref = next((r for r in rows if r["method"] == "none" and r["format"] == "fp16"), None)
            if ref:
                ax.axhline(ref["avg_score"], color="k", ls="--", lw=1, label="one adapter per task (fp16)")
            if base_scores:
                ax.axhline(statistics.mean(base_scores.values()), color="grey", ls=":", lw=1, label="base model")
            curves = (
                ("hydraopt", "data-free", "C3", "-D", "hydraopt (shared factors)"),
                ("hydraopt", "calibrated", "C1", "-D", "hydraopt, calibrated"),
                ("hydraopt", "calibrated, KL choice", "C6", "-D", "hydraopt, calibrated, KL choice"),
                ("per-task", "data-free", "C0", "--o", "per-task compression (nothing shared)"),
                ("per-task", "calibrated", "C9", "--o", "per-task compression, calibrated"),
                ("per-task", "calibrated, KL choice", "C5", "--o", "per-task compression, calibrated, KL choice"),
                ("compeft", "data-free", "C4", ":v", "ComPEFT (sparse signs, nothing shared)"),
            )
            for method, how, colour, style, label in curves:
                curve = sorted((r for r in rows if r["method"] == method and r["format"] == "auto" and mode(r) == how), key=lambda r: r["storage_fraction"])
                if curve:
                    ax.plot([r["storage_fraction"] for r in curve], [r["avg_score"] for r in curve], style, color=colour, lw=2, label=label)
            for r in (r for r in rows if r["method"] == "none"):
                ax.scatter(r["storage_fraction"], r["avg_score"], marker=markers[r["format"]], color="k", s=50, label=f"one adapter per task {r['format']}")
            for r in (r for r in rows if r["method"] in BASELINES):
                ax.scatter(r["storage_fraction"], r["avg_score"], marker=markers.get(r["format"], "x"), color="C2", alpha=0.7, s=35, label=f"baselines (one merged adapter) {r['format']}")
            ax.set_xscale("log")
            ax.set_xticks([0.02, 0.05, 0.1, 0.2, 0.5, 1.0], ["0.02", "0.05", "0.1", "0.2", "0.5", "1"])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("storage (file bytes / fp16 one-adapter-per-task files, log)")
            ax.set_ylabel("average task score")
            ax.set_title(f"SmolLM2-135M suite, {init}")
            handles, labels = ax.get_legend_handles_labels()
            uniq = dict(zip(labels, handles))
            ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
            ax.grid(alpha=0.3)
