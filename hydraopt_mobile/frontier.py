"""The storage-accuracy frontier: merge the suite's adapters with every method and score the results.

One record per (method, budget, format, init): storage as a fraction of fp16 one-adapter-per-task
(exact payload bytes) and the suite's task scores, with the drop against one-adapter-per-task
trained with the same init. Records are appended to the JSON file as they are measured, so a long
run can be resumed and a partial run still leaves its numbers.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from .adapters import AdapterSet
from .bank import MergedBank
from .formats import NumberFormat
from .merge.budget import Budget
from .merge.registry import MergeConfig, merge, merge_budgets


@dataclass(frozen=True)
class Point:
    """One point to measure: a method, its budget (hydraopt) and its number format (None: planner's choice)."""

    method: str
    budget: float | None = None
    fmt: str | None = None

    def key(self, init: str) -> tuple:
        return (self.method, self.budget, self.fmt or "auto", init)


def default_points(n_tasks: int) -> list[Point]:
    """HydraOpt from the one-merged-adapter point (1/T of the bytes) through the one-shared-A point
    (about half) and beyond; baselines in fp16, int8 and int4. Ordered by importance, so that a
    run cut short still has the reference, the HydraOpt curve and every fp16 baseline."""
    one_adapter = round(1.0 / n_tasks, 4)
    baselines = ("svd", "ties", "task-arithmetic", "dare-ties", "knots")
    points = [Point("none", fmt="fp16")]
    points += [Point("hydraopt", b) for b in (one_adapter, 0.15, 0.3, 0.52)]
    points += [Point(m, fmt="fp16") for m in baselines]
    points += [Point("hydraopt", 0.75), Point("hydraopt", 0.52, "fp16"), Point("hydraopt", 0.15, "int4")]
    points += [Point(m, fmt=f) for f in ("int8", "int4") for m in baselines]
    return points


def bank_for(adapters: AdapterSet, point: Point) -> MergedBank:
    fmt = NumberFormat.parse(point.fmt) if point.fmt else None
    if point.method == "hydraopt":
        return merge_budgets(adapters, MergeConfig("hydraopt", fmt=fmt), [Budget(fraction=point.budget)], progress=True)[0]
    return merge(adapters, MergeConfig(point.method, fmt=fmt or NumberFormat("fp16")), progress=False)


def record(point: Point, init: str, bank: MergedBank, scores: dict[str, float], reference: dict[str, float] | None, seconds: float) -> dict:
    avg = statistics.mean(scores.values())
    ref_avg = statistics.mean(reference.values()) if reference else avg
    return {
        "method": point.method,
        "budget": point.budget,
        "format": point.fmt or "auto",
        "init": init,
        "storage_fraction": bank.payload_bytes() / bank.reference_fp16_bytes,
        "payload_bytes": bank.payload_bytes(),
        "reference_fp16_bytes": bank.reference_fp16_bytes,
        "avg_score": avg,
        "drop_points": ref_avg - avg,
        "rel_drop_pct": 100 * (ref_avg - avg) / ref_avg if ref_avg else 0.0,
        "scores": scores,
        "rel_errors": bank.rel_errors,
        "layouts": sorted({f"{m.layout[0]}x{m.layout[1]} r{m.rank} {m.fmt.label()}" for m in bank.modules.values()}),
        "eval_seconds": seconds,
    }


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text())["records"] if path.exists() else []


def save_records(path: Path, records: list[dict], meta: dict) -> None:
    """Write the results file via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    tmp.replace(path)


def run_frontier(adapters: AdapterSet, init: str, points: list[Point], evaluate_bank, out: Path, meta: dict) -> list[dict]:
    """Measure every point not yet in ``out`` (resumable); ``evaluate_bank(bank) -> task scores``."""
    records = load_records(out)
    done = {(r["method"], r["budget"], r["format"], r["init"]) for r in records}
    todo = [p for p in points if p.key(init) not in done]
    reference = next((r["scores"] for r in records if r["method"] == "none" and r["init"] == init), None)
    for point in todo:
        bank = bank_for(adapters, point)
        t0 = time.perf_counter()
        scores = evaluate_bank(bank)
        if point.method == "none":
            reference = scores
        records.append(record(point, init, bank, scores, reference if point.method != "none" else None, time.perf_counter() - t0))
        save_records(out, records, meta)
    return records


def plot_frontier(records: list[dict], png: Path, base_scores: dict[str, float] | None = None) -> None:
    """Storage (x) against average score (y), one curve per method, one panel per init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    inits = sorted({r["init"] for r in records})
    fig, axes = plt.subplots(1, len(inits), figsize=(7 * len(inits), 5), squeeze=False)
    markers = {"fp16": "o", "int8": "s", "int4": "^", "auto": "D"}
    for ax, init in zip(axes[0], inits):
        rows = [r for r in records if r["init"] == init]
        ref = next((r for r in rows if r["method"] == "none"), None)
        if ref:
            ax.axhline(ref["avg_score"], color="k", ls="--", lw=1, label="one adapter per task (fp16)")
        if base_scores:
            ax.axhline(statistics.mean(base_scores.values()), color="grey", ls=":", lw=1, label="base model")
        hydra = sorted((r for r in rows if r["method"] == "hydraopt" and r["format"] == "auto"), key=lambda r: r["storage_fraction"])
        if hydra:
            ax.plot([r["storage_fraction"] for r in hydra], [r["avg_score"] for r in hydra], "-D", color="C3", lw=2, label="hydraopt (planner picks format)")
        palette = iter(["C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9"])
        colours = {m: "C3" if m == "hydraopt" else next(palette) for m in sorted({r["method"] for r in rows} - {"none"})}
        for r in rows:
            if r["method"] == "none" or (r["method"] == "hydraopt" and r["format"] == "auto"):
                continue
            ax.scatter(r["storage_fraction"], r["avg_score"], marker=markers.get(r["format"], "x"), color=colours[r["method"]], s=40, label=f"{r['method']} {r['format']}")
        ax.set_xscale("log")
        ax.set_xticks([0.02, 0.05, 0.1, 0.2, 0.5, 1.0], ["0.02", "0.05", "0.1", "0.2", "0.5", "1"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("storage (fraction of fp16 one-adapter-per-task, log)")
        ax.set_ylabel("average task score")
        ax.set_title(f"SmolLM2-135M suite, {init}")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=6, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def markdown_table(records: list[dict]) -> str:
    lines = ["| init | method | budget | format | storage | avg score | drop (pts) | drop (%) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["init"], r["method"] != "none", r["method"], r["storage_fraction"])):
        budget = "-" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(f"| {r['init']} | {r['method']} | {budget} | {r['format']} | {r['storage_fraction']:.3f} | {r['avg_score']:.2f} | {r['drop_points']:+.2f} | {r['rel_drop_pct']:+.2f} |")
    return "\n".join(lines) + "\n"
