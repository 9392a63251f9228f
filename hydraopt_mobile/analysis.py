"""Similarity of task adapters, per module and per layer type (METHOD.md, "The observation").

Two views: what a practitioner sees (raw cosine of the A's and of the B's, which depends on the
arbitrary factorisation), and the rotation-invariant ones the planner groups tasks by (overlap of
the row spaces and of the column spaces of the updates dW, the mean squared cosine of their
principal angles; and the cosine of the updates dW). Every measure comes from
hydraopt_mobile/similarity.py, so the heatmaps show what the planner used.

Changed definition: before the layout refactor, ``subspace_A`` and ``subspace_B`` were the overlaps of
the row space of A and the column space of B (singular values below 1e-8 of the largest dropped,
float64). They are now those of the update dW = B A, with the planner's cut-off (1e-6) in its
float32 factored space; the two agree where B (for rows) and A (for columns) have full rank.
``similarity.json`` names each definition under ``definitions``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from hydraopt_mobile.adapters import AdapterSet, LoraFactors
from hydraopt_mobile.atomic import atomic_dir, json_marker
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.factored import factor_space
from hydraopt_mobile.merge.method import OnStep, each_module
from hydraopt_mobile.paths import confined
from hydraopt_mobile.plotting import figure
from hydraopt_mobile.similarity import CUTOFF, DEFINITIONS, column_space_overlap, factor_cosine, row_space_overlap, update_cosine

METRICS = ("cos_A", "cos_B", "subspace_A", "subspace_B", "cos_dW")
FORMAT = "hydraopt-analysis"
ANALYSIS = json_marker("similarity analysis", "similarity.json", "format", FORMAT)


def module_similarity(factors: list[LoraFactors]) -> dict[str, list[list[float]]]:
    """Every metric of one module as a (T, T) matrix."""
    fm = factor_space(factors)
    T = len(factors)
    return {
        "cos_A": [[1.0 if s == t else factor_cosine(factors[s].A, factors[t].A) for t in range(T)] for s in range(T)],
        "cos_B": [[1.0 if s == t else factor_cosine(factors[s].B, factors[t].B) for t in range(T)] for s in range(T)],
        "subspace_A": row_space_overlap(fm).tolist(),
        "subspace_B": column_space_overlap(fm).tolist(),
        "cos_dW": update_cosine(fm).double().tolist(),
    }


def layer_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _mean(mats: list[list[list[float]]]) -> list[list[float]]:
    t = torch.tensor(mats, dtype=torch.float64)
    return torch.nanmean(t, dim=0).tolist()


def _off_diagonal_mean(mat: list[list[float]]) -> float:
    t = torch.tensor(mat, dtype=torch.float64)
    mask = ~torch.eye(t.shape[0], dtype=torch.bool)
    return float(torch.nanmean(t[mask])) if t.shape[0] > 1 else float("nan")


def analyze(adapters: AdapterSet, on_step: OnStep | None = None) -> dict:
    """Per module, per layer type (mean over its modules) and summarised (mean off-diagonal)."""
    per_module = each_module(adapters, lambda _, __, factors: module_similarity(factors), on_step)
    by_type: dict[str, dict[str, list]] = {}
    for name, sims in per_module.items():
        entry = by_type.setdefault(layer_type(name), {m: [] for m in METRICS})
        for m in METRICS:
            entry[m].append(sims[m])
    by_type_mean = {lt: {m: _mean(v[m]) for m in METRICS} for lt, v in by_type.items()}
    summary = {lt: {m: _off_diagonal_mean(v[m]) for m in METRICS} for lt, v in by_type_mean.items()}
    definitions = {m: DEFINITIONS[m] for m in METRICS}
    return {"tasks": adapters.task_names, "metrics": list(METRICS), "definitions": definitions, "summary": summary, "by_layer_type": by_type_mean, "modules": per_module}


def plot_heatmaps(result: dict, out_dir: Path) -> list[Path]:
    paths = []
    tasks = result["tasks"]
    titles = {"cos_A": "cosine(A)", "cos_B": "cosine(B)", "subspace_A": "row-space overlap(dW)", "subspace_B": "column-space overlap(dW)", "cos_dW": "cosine(dW)"}
    for lt, mats in result["by_layer_type"].items():
        path = confined(out_dir, f"similarity_{lt}.png", UserError)
        with figure(path, len(METRICS), figsize=(4.2 * len(METRICS), 4.2), layout="constrained") as (fig, axes):
            for ax, m in zip(axes, METRICS):
                im = ax.imshow(torch.tensor(mats[m]).numpy(), vmin=-1 if m.startswith("cos") else 0, vmax=1, cmap="RdBu_r" if m.startswith("cos") else "viridis")
                ax.set_title(f"{lt}: {titles[m]}", fontsize=9)
                ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=6)
                ax.set_yticks(range(len(tasks)), tasks, fontsize=6)
                fig.colorbar(im, ax=ax, shrink=0.7)
            fig.suptitle(f"{lt}: overlaps are of the updates dW = B A (the planner's definitions; singular values below {CUTOFF:g} of the largest dropped)", fontsize=9)
        paths.append(path)
    return paths


def json_safe(value: object) -> object:
    """``value`` with every NaN replaced by None: JSON has no NaN (a similarity is undefined between
    factors of different ranks, and the off-diagonal mean of a single task)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_analysis(adapters: AdapterSet, out: Path, overwrite: bool = False, on_step: OnStep | None = None) -> dict:
    """Write ``similarity.json`` (undefined values as null) and the heatmaps to ``out``."""
    result = analyze(adapters, on_step)
    with atomic_dir(out, overwrite, kind=ANALYSIS, inputs=[t.path for t in adapters.tasks]) as tmp:
        (tmp / "similarity.json").write_text(json.dumps(json_safe({"format": FORMAT, **result}), indent=1, allow_nan=False))
        plot_heatmaps(result, tmp)
    return result
