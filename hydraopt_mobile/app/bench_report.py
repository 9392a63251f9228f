"""Markdown table and plot of ``bench_host`` records (one summary row per export)."""

from __future__ import annotations

import statistics
from pathlib import Path

from rich.table import Table

from hydraopt_mobile.plotting import figure

from .records import cell, dict_table


def summarise(records: list[dict]) -> list[dict]:
    """Per export: bytes, mean scores over its tasks, worst parity, median latencies."""
    rows = []
    for export in dict.fromkeys(r["export"] for r in records):
        rs = [r for r in records if r["export"] == export]
        errs = [r["max_logit_err"] for r in rs if r["max_logit_err"] is not None]
        agree = [r["token_agreement"] for r in rs if r["token_agreement"] is not None]
        decode = [r["decode_ms_per_token"] for r in rs if r["decode_ms_per_token"] is not None]
        rows.append(
            {
                "export": export,
                "runtime": rs[0]["runtime"],
                "quant": rs[0]["quant"],
                "method": rs[0]["method"],
                "tasks": len(rs),
                "bytes_resident": rs[0]["bytes_resident"],
                "bytes_task_mean": statistics.mean(r["bytes_task"] for r in rs),
                "bytes_total": rs[0]["bytes_total"],
                "score": statistics.mean(r["score"] for r in rs),
                "score_pytorch": statistics.mean(r["score_pytorch"] for r in rs),
                "max_logit_err": max(errs) if errs else None,
                "token_agreement": statistics.mean(agree) if agree else None,
                "switch_ms": statistics.median(r["switch_ms"] for r in rs),
                "task_load_ms": statistics.median(r["task_load_ms"] for r in rs),
                "program_load_ms": rs[0]["program_load_ms"],
                "decode_ms_per_token": statistics.median(decode) if decode else None,
                "prefill_ms": statistics.median(r["prefill_ms"] for r in rs),
                "peak_rss_mb": rs[0]["peak_rss_mb"],
                **{k: rs[0][k] for k in ("export_seconds", "program_source") if k in rs[0]},  # benchmarks/export_host.py adds them
            }
        )
    return rows


SUMMARY_COLUMNS = (
    ("export", "export"), ("runtime", "runtime"), ("quant", "quant"), ("method", "method"), ("tasks", "tasks"),
    ("resident MB", "MB_resident"), ("task file KB (mean)", "KB_task"), ("score (runtime)", "score"), ("score (PyTorch)", "score_pytorch"),
    ("max logit err", "max_logit_err"), ("token agreement", "token_agreement"), ("switch ms", "switch_ms"),
    ("decode ms/token", "decode_ms_per_token"), ("peak RSS MB", "peak_rss_mb"),
)


def _with_units(summary: list[dict]) -> list[dict]:
    """Summary rows plus their byte counts in MB / KB."""
    return [{**row, "MB_total": row["bytes_total"] / 1e6, "MB_resident": row["bytes_resident"] / 1e6, "KB_task": row["bytes_task_mean"] / 1e3} for row in summary]


def summary_table(records: list[dict]) -> Table:
    """What ``hydraopt bench host`` prints: one row per export (means over its tasks; latencies are
    medians over tasks), the same figures as the Markdown report's first table."""
    table = Table(*(title for title, _ in SUMMARY_COLUMNS), title="host benchmark (means over tasks; latencies: medians)")
    for row in _with_units(summarise(records)):
        table.add_row(*(cell(row.get(key)) for _, key in SUMMARY_COLUMNS))
    return table


def bench_markdown(records: list[dict], notes: dict) -> str:
    """The report: notes, one summary row per export, one row per export and task."""
    summary = _with_units(summarise(records))
    lines = ["# Host benchmark of the exports", ""]
    lines += [f"- **{k}**: {v}" for k, v in notes.items()]
    lines += ["", "## Per export (means over tasks; latencies, switch_ms and task_load_ms are medians over tasks)", ""]
    lines += dict_table(
        summary,
        ["export", "runtime", "quant", "method", "tasks", "MB_resident", "KB_task", "MB_total", "score", "score_pytorch",
         "max_logit_err", "token_agreement", "switch_ms", "task_load_ms", "program_load_ms", "prefill_ms", "decode_ms_per_token",
         "peak_rss_mb", *(["export_seconds", "program_source"] if any("export_seconds" in r for r in summary) else [])],
    )
    lines += ["", "## Per task", ""]
    lines += dict_table(
        records,
        ["export", "task", "bytes_task", "score", "score_pytorch", "max_logit_err", "token_agreement", "switch_ms",
         "task_load_ms", "decode_ms_per_token"],
    )
    return "\n".join(lines) + "\n"


def write_plot(records: list[dict], path: Path) -> None:
    summary = summarise(records)
    labels = [r["export"] for r in summary]
    panels = [
        ("total MB on disk (all tasks)", [r["bytes_total"] / 1e6 for r in summary]),
        ("mean score (runtime)", [r["score"] for r in summary]),
        ("decode ms / token", [r["decode_ms_per_token"] or 0 for r in summary]),
        ("task switch ms", [r["switch_ms"] for r in summary]),
    ]
    with figure(path, len(panels), figsize=(4.2 * len(panels), 0.45 * len(labels) + 2.2)) as (fig, axes):
        for ax, (title, values) in zip(axes, panels):
            ax.barh(labels, values, color=["tab:blue" if "onnx" in r["runtime"] else "tab:orange" for r in summary])
            ax.set_title(title, fontsize=10)
            ax.tick_params(axis="y", labelsize=7)
            ax.invert_yaxis()
        for ax in axes[1:]:
            ax.set_yticklabels([])
        fig.suptitle("hydraopt exports on the host (blue: ONNX Runtime, orange: ExecuTorch)", fontsize=11)
