"""The picture of a device target's record: per task, the score from the target's outputs beside the
host's on the same examples, and each merge's drop against one-adapter-per-task on the target and on
the host with its 95 % paired interval (the issue's "the merge survives the device path" at a glance).

``arm64-cpu`` and ``qnn-htp`` records differ in where the drops sit (``notes.drops`` keyed
``method/quant``, or on the averaged records); both come here as :class:`Drop` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from hydraopt_mobile.plotting import figure


@dataclass(frozen=True)
class Drop:
    """One merge's drop vs one-adapter-per-task (points, 95 % interval) on the target and on the host."""

    label: str
    target: dict  # paired_drop's {"drop_points", "drop_points_ci95", ...}
    host: dict


def series_label(record: dict) -> str:
    """``method (budget) quant``: what tells two series of one target apart."""
    budget = f" ({record['budget']})" if record.get("budget") else ""
    return f"{record['method']}{budget} {record['quant']}"


def _score(record: dict | None, key: str) -> float:
    """A record's score, NaN (nothing drawn) where the task has no record or was not scored (``None``)."""
    return np.nan if record is None or record.get(key) is None else record[key]


def plot_scores(per_task: list[dict], drops: list[Drop], title: str) -> Callable[[Path], None]:
    """``plot(png)`` for :func:`hydraopt_mobile.app.records.write_record`: left, per task the target's score
    (bars, one per series) and the host's on the same examples (black ticks); right, the drops."""
    series = list(dict.fromkeys(series_label(r) for r in per_task))
    tasks = list(dict.fromkeys(r["task"] for r in per_task))
    by = {(series_label(r), r["task"]): r for r in per_task}

    def plot(png: Path) -> None:
        with figure(png, 2, figsize=(13, 4.2), layout="constrained") as (fig, (ax, bx)):
            width = 0.8 / len(series)
            for i, name in enumerate(series):
                x = np.arange(len(tasks)) + (i - (len(series) - 1) / 2) * width
                rows = [by.get((name, t)) for t in tasks]
                ax.bar(x, [_score(r, "score") for r in rows], width, label=f"{name} (target)")
                ax.scatter(x, [_score(r, "score_host") for r in rows], marker="_", s=120, color="black",
                           label="host, same examples" if i == 0 else None, zorder=3)
            ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
            if all(r.get("score") is None for r in per_task):
                ax.text(0.5, 0.5, "not scored: prompts without reference answers", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            ax.set_ylabel("score (exact, %)")
            ax.set_ylim(0, 125)  # room for the legend above the 100 % bars
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7, loc="upper center", ncol=2)
            for j, d in enumerate(drops):
                for k, (where, drop, marker) in enumerate((("target", d.target, "o"), ("host", d.host, "s"))):
                    lo, hi = drop["drop_points_ci95"]
                    y = j - 0.15 + 0.3 * k
                    bx.errorbar(drop["drop_points"], y, xerr=[[drop["drop_points"] - lo], [hi - drop["drop_points"]]], fmt=marker,
                                color=f"C{k}", capsize=3, label=where if j == 0 else None)
            bx.axvline(0, color="grey", lw=0.8)
            bx.set_yticks(range(len(drops)), [d.label for d in drops], fontsize=8)
            bx.set_ylim(-0.8, max(len(drops), 1) - 0.2)
            bx.set_xlabel("drop vs one-adapter-per-task (points, 95 % paired CI)")
            if drops:
                bx.legend(fontsize=7)
            else:
                bx.text(0.5, 0.5, "no merge with a one-adapter-per-task\nexport in this record", ha="center", va="center",
                        transform=bx.transAxes, fontsize=8)

    return plot
