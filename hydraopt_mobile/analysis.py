"""Similarity of task adapters, per module and per layer type (METHOD.md, "The observation").

Two views: what a practitioner sees (raw cosine of the A's and of the B's, which depends on the
arbitrary factorisation), and rotation-invariant ones (overlap of the A row spaces and of the B
column spaces, the mean squared cosine of their principal angles; and the cosine of the updates dW).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from rich.progress import Progress

from hydraopt_mobile.adapters import AdapterSet, LoraFactors
from hydraopt_mobile.atomic import atomic_dir, json_marker
from hydraopt_mobile.factored import inner, sq_norm
from hydraopt_mobile.paths import confined

METRICS = ("cos_A", "cos_B", "subspace_A", "subspace_B", "cos_dW")
FORMAT = "hydraopt-analysis"
ANALYSIS = json_marker("similarity analysis", "similarity.json", "format", FORMAT)


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.shape != y.shape:
        return float("nan")  # different ranks: raw factors are not comparable entry by entry
    d = float(x.norm() * y.norm())
    return float((x * y).sum()) / d if d > 0 else 0.0


def _basis(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (as rows) of the row space of m."""
    if m.numel() == 0:
        return m
    _, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return vh[s > s[0] * 1e-8] if s[0] > 0 else vh[:0]


def _overlap(u: torch.Tensor, v: torch.Tensor) -> float:
    k = min(u.shape[0], v.shape[0])
    return float(((u @ v.T) ** 2).sum()) / k if k else 0.0


def module_similarity(factors: list[LoraFactors]) -> dict[str, list[list[float]]]:
    T = len(factors)
    rows = [_basis(f.A) for f in factors]
    cols = [_basis(f.B.T) for f in factors]
    norms = [sq_norm(f) ** 0.5 for f in factors]
    out = {m: [[1.0] * T for _ in range(T)] for m in METRICS}
    for s in range(T):
        for t in range(s + 1, T):
            fs, ft = factors[s], factors[t]
            vals = {
                "cos_A": _cos(fs.A, ft.A),
                "cos_B": _cos(fs.B, ft.B),
                "subspace_A": _overlap(rows[s], rows[t]),
                "subspace_B": _overlap(cols[s], cols[t]),
                "cos_dW": inner(fs, ft) / (norms[s] * norms[t]) if norms[s] * norms[t] > 0 else 0.0,
            }
            for m, v in vals.items():
                out[m][s][t] = out[m][t][s] = v
    return out


def layer_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _mean(mats: list[list[list[float]]]) -> list[list[float]]:
    t = torch.tensor(mats, dtype=torch.float64)
    return torch.nanmean(t, dim=0).tolist()


def _off_diagonal_mean(mat: list[list[float]]) -> float:
    t = torch.tensor(mat, dtype=torch.float64)
    mask = ~torch.eye(t.shape[0], dtype=torch.bool)
    return float(torch.nanmean(t[mask])) if t.shape[0] > 1 else float("nan")


def analyze(adapters: AdapterSet, progress: bool = True) -> dict:
    per_module = {}
    with Progress(disable=not progress, transient=True) as bar:
        for name in bar.track(adapters.module_names, description="similarity: modules"):
            per_module[name] = module_similarity(adapters.factors(name))
    by_type: dict[str, dict[str, list]] = {}
    for name, sims in per_module.items():
        entry = by_type.setdefault(layer_type(name), {m: [] for m in METRICS})
        for m in METRICS:
            entry[m].append(sims[m])
    by_type_mean = {lt: {m: _mean(v[m]) for m in METRICS} for lt, v in by_type.items()}
    summary = {lt: {m: _off_diagonal_mean(v[m]) for m in METRICS} for lt, v in by_type_mean.items()}
    return {"tasks": adapters.task_names, "metrics": list(METRICS), "summary": summary, "by_layer_type": by_type_mean, "modules": per_module}


def plot_heatmaps(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    tasks = result["tasks"]
    titles = {"cos_A": "cosine(A)", "cos_B": "cosine(B)", "subspace_A": "row-space overlap(A)", "subspace_B": "column-space overlap(B)", "cos_dW": "cosine(dW)"}
    for lt, mats in result["by_layer_type"].items():
        fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4.2), constrained_layout=True)
        for ax, m in zip(axes, METRICS):
            im = ax.imshow(torch.tensor(mats[m]).numpy(), vmin=-1 if m.startswith("cos") else 0, vmax=1, cmap="RdBu_r" if m.startswith("cos") else "viridis")
            ax.set_title(f"{lt}: {titles[m]}", fontsize=9)
            ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=6)
            ax.set_yticks(range(len(tasks)), tasks, fontsize=6)
            fig.colorbar(im, ax=ax, shrink=0.7)
        path = confined(out_dir, f"similarity_{lt}.png", ValueError)
        fig.savefig(path, dpi=110)
        plt.close(fig)
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


def write_analysis(adapters: AdapterSet, out: Path, overwrite: bool = False) -> dict:
    """Write ``similarity.json`` (undefined values as null) and the heatmaps to ``out``."""
    result = analyze(adapters)
    with atomic_dir(out, overwrite, kind=ANALYSIS, inputs=[t.path for t in adapters.tasks]) as tmp:
        (tmp / "similarity.json").write_text(json.dumps(json_safe({"format": FORMAT, **result}), indent=1, allow_nan=False))
        plot_heatmaps(result, tmp)
    return result
