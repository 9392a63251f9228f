"""The demo's results: one row per compared bank, the verdict sentence, and the three views of them
(the terminal table, demo.md, demo.png)."""

from __future__ import annotations

import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.plotting import figure
from hydraopt_mobile.sharing import layout_summary, plan_label
from hydraopt_mobile.suite.metrics import paired_drop

from .records import markdown_table, print_unwrapped

REFERENCE = "one adapter per task"
COLUMNS = ["", "plan", "storage", "file bytes", "avg", "drop (pts)", "drop (%)", "95 % CI (pts)"]


def result_row(label: str, bank: MergedBank, examples: dict[str, list[float]], reference: dict[str, list[float]]) -> dict:
    """One compared bank: its plan, bytes and scores, and its drop against ``reference`` (paired)."""
    scores = {t: statistics.fmean(v) for t, v in examples.items()}
    return {
        "label": label,
        "method": bank.method,
        "params": bank.params,
        "plan": plan_label(bank),
        "layout_summary": layout_summary(bank),
        "file_bytes": bank.total_file_bytes(),
        "reference_file_bytes": bank.reference_file_bytes,
        "storage_fraction": bank.storage_fraction(),
        "avg_score": statistics.fmean(scores.values()),
        **paired_drop(reference, examples),
        "scores": scores,
    }


def verdict(rows: list[dict]) -> str:
    """One sentence: which of the compressed rows scored best, and what HydraOpt shared."""
    compressed = [r for r in rows if r["label"] != REFERENCE]
    best = max(compressed, key=lambda r: r["avg_score"])
    hydra = next(r for r in rows if r["method"] == "hydraopt")
    shared = {k: n for k, n in hydra["layout_summary"]["sharing"].items() if k != "no sharing"}
    what = (
        "HydraOpt shared no factor (its plan is per-task rank/format only)"
        if not shared
        else f"HydraOpt shared factors in {sum(shared.values())} of {hydra['layout_summary']['modules']} modules ({', '.join(f'{k} x{n}' for k, n in shared.items())})"
    )
    low, high = best["drop_points_ci95"]
    return (
        f"At {hydra['storage_fraction']:.3f} of the fp16 file bytes, {best['label']} scored best ({best['avg_score']:.2f}, "
        f"{best['drop_points']:+.2f} points vs one adapter per task, 95 % CI [{low:+.2f}, {high:+.2f}]); {what}."
    )


def _cells(r: dict) -> list[str]:
    """The cells the table and demo.md share, for one row."""
    low, high = r["drop_points_ci95"]
    return [r["label"], r["plan"], f"{r['storage_fraction']:.4f}", f"{r['file_bytes']:,}", f"{r['avg_score']:.2f}", f"{r['drop_points']:+.2f}",
            f"{r['rel_drop_pct']:+.2f}", f"[{low:+.2f}, {high:+.2f}]"]


def _base_cells(result: dict) -> list[str]:
    return ["base model", "", "0", "0", f"{statistics.mean(result['base_model_scores'].values()):.2f}", "", "", ""]


def demo_markdown(result: dict) -> str:
    tasks = result["tasks"]
    base = result["base_model_scores"]
    rows = [_base_cells(result) + [f"{base[t]:.1f}" for t in tasks]]
    rows += [_cells(r) + [f"{r['scores'][t]:.1f}" for t in tasks] for r in result["rows"]]
    lines = [
        "Storage: file bytes of the bundle's tensor files / the same adapters stored as they are in fp16 (one file per task).",
        "",
        *markdown_table(COLUMNS + tasks, rows),
        "",
        result["verdict"],
    ]
    if result.get("export_host"):
        host = ([r["export"], r["task"], f"{r['bytes_resident']:,}", f"{r['bytes_task']:,}", f"{r['switch_ms']:.4f}", f"{r['decode_ms_per_token']:.1f}", f"{r['score']:.1f}"]
                for r in result["export_host"])
        lines += ["", "Exports on the real runtime (first tasks, few examples):", "",
                  *markdown_table(["export", "task", "bytes resident", "bytes task", "switch ms", "decode ms/token", "score"], host)]
    return "\n".join(lines) + "\n"


def print_table(result: dict, console: Console) -> None:
    """The rows as a table as wide as its content (not wrapped at the terminal's or a pipe's 80 columns), then the verdict."""
    table = Table(*COLUMNS, title="SmolLM2-135M suite, test split (storage: fraction of fp16 one-adapter-per-task file bytes)")
    table.add_row(*_base_cells(result))
    for r in result["rows"]:
        table.add_row(*_cells(r))
    print_unwrapped(table, console)
    console.print(result["verdict"], soft_wrap=True)


def plot(result: dict, png: Path) -> None:
    with figure(png, figsize=(6, 4.5), dpi=120) as (_, ax):
        for i, r in enumerate(result["rows"]):
            ax.scatter(r["storage_fraction"], r["avg_score"], s=60, color=f"C{i}", label=r["label"])
        ax.axhline(statistics.mean(result["base_model_scores"].values()), color="grey", ls=":", label="base model")
        ax.set_xlabel("storage (file bytes / fp16 one-adapter-per-task file bytes)")
        ax.set_ylabel("average task score")
        ax.set_title("hydraopt demo: storage vs score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
