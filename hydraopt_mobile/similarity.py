"""How alike the tasks' LoRA updates are: the one definition behind both the planner's task
groupings (merge/grouping.py) and the heatmaps of ``hydraopt analyze`` (analysis.py).

The planner's measures are of the updates ``dW_t = B_t A_t`` themselves, computed in one module's
factored space (factored.py), batched over tasks, and so independent of how an update happens to be
split into B and A:

- :func:`row_space_overlap` (the A-grouping): the mean squared cosine of the principal angles between
  the row spaces of two updates, ``||V_s^T V_t||_F^2 / min(k_s, k_t)``. ``V_t`` is an orthonormal
  basis of the row space of ``dW_t``, from one batched SVD of ``R_t a_t`` (``dW_t = U_t R_t a_t Q^T``
  with ``B_t = U_t R_t``), keeping the singular values above 1e-6 of the task's largest.
- :func:`column_space_overlap`: the same on the column spaces (``dW_t = B_t R'_t^T (Q Q'_t)^T`` with
  ``a_t^T = Q'_t R'_t``, so the columns of ``B_t R'_t^T`` span them); drawn, not used for grouping.
- :func:`update_cosine` (the B-grouping): ``<dW_s, dW_t> / (||dW_s|| ||dW_t||)``.

:func:`factor_cosine` is what a practitioner computes first: the cosine of two raw factor
matrices. It depends on the arbitrary factorisation, so the heatmaps show it beside the others.
"""

from __future__ import annotations

import torch

from hydraopt_mobile.factored import FactoredModule, b_gram
from hydraopt_mobile.lapack import gram

CUTOFF = 1e-6  # singular values below this fraction of the task's largest do not span its space
DEFINITIONS = {
    "cos_A": "cosine of the raw A factors (depends on the factorisation; NaN between different ranks)",
    "cos_B": "cosine of the raw B factors (depends on the factorisation; NaN between different ranks)",
    "subspace_A": f"row-space overlap of the updates dW = B A: mean squared cosine of the principal angles, singular values below {CUTOFF:g} of the largest dropped (the planner's A-grouping similarity)",
    "subspace_B": f"column-space overlap of the updates dW = B A: mean squared cosine of the principal angles, singular values below {CUTOFF:g} of the largest dropped",
    "cos_dW": "cosine of the updates dW = B A (the planner's B-grouping similarity)",
}


def row_space_overlap(fm: FactoredModule) -> torch.Tensor:
    """(T, T) overlap of the tasks' row spaces: mean squared cosine of their principal angles."""
    return _overlap(_row_bases(fm.RA))


def column_space_overlap(fm: FactoredModule) -> torch.Tensor:
    """(T, T) overlap of the tasks' column spaces: mean squared cosine of their principal angles."""
    R = torch.linalg.qr(fm.a.transpose(1, 2), mode="r")[1]  # a_t^T = Q'_t R'_t, batched
    return _overlap(_row_bases((fm.B @ R.transpose(1, 2)).transpose(1, 2)))


def update_cosine(fm: FactoredModule, gb: torch.Tensor | None = None) -> torch.Tensor:
    """(T, T) cosine similarity of the updates dW_t (``gb``: ``b_gram(fm.B)`` if the caller has it)."""
    T, d_out, r = fm.B.shape
    gb = b_gram(fm.B) if gb is None else gb
    ga = gram(fm.a.reshape(T * r, -1), rows=True).reshape(T, r, T, r)
    # <dW_s, dW_t> = tr((B_s^T B_t)(a_t a_s^T)) = sum_ij gb[s,i,t,j] * ga[s,i,t,j]
    inner = (gb * ga).sum((1, 3))
    norms = fm.sq_norms.sqrt().clamp_min(1e-30)
    return inner / norms.view(-1, 1) / norms.view(1, -1)


def factor_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine of two factor matrices entry by entry; NaN when their shapes (ranks) differ."""
    if x.shape != y.shape:
        return float("nan")
    d = float(x.norm() * y.norm())
    return float((x * y).sum()) / d if d > 0 else 0.0


def _row_bases(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task, an orthonormal basis (as rows, zero rows beyond its rank) of the row space of
    ``m[t]`` and that rank, from one batched SVD."""
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    top = s[:, :1]
    keep = s > torch.where(top > 0, top * CUTOFF, torch.ones_like(top))
    return vh * keep.unsqueeze(2), keep.sum(1)


def _overlap(bases: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(T, T) ``||V_s V_t^T||_F^2 / min(k_s, k_t)`` for all pairs from one (T k) x (T k) product;
    1 on the diagonal, 0 where a task has no row space."""
    V, ranks = bases
    T, k, n = V.shape
    flat = V.reshape(T * k, n)
    sq = (gram(flat, rows=True).double().reshape(T, k, T, k) ** 2).sum((1, 3))
    low = torch.minimum(ranks.view(-1, 1), ranks.view(1, -1)).double()
    sim = torch.where(low > 0, sq / low.clamp_min(1), torch.zeros_like(sq))
    return sim.fill_diagonal_(1.0)
