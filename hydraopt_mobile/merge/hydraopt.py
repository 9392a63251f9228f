"""HydraOpt: shared factors plus per-task tensors, solved in the factored space (METHOD.md).

For one module and a layout (A-grouping ``a_index``, B-grouping ``b_index``, shared rank r'),
``solve_layout`` minimises ``sum_t w_t ||dW_t - B^_{b(t)} A^_{a(t)}||_F^2``: A-groups start from the
closed form (top right singular vectors of the group's stacked updates), then alternating least
squares, each step an exact least-squares solve, so the objective never increases. With one
A-group and a B per task the start is already optimal. ``fit_stored`` quantises A^, re-fits B to
the quantised A (cheap, and it recovers much of the quantisation error), then quantises B.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..bank import MergedModule
from ..factored import DTYPE, FactoredModule
from ..formats import NumberFormat, StoredFactor


@dataclass
class LayoutSolution:
    a_index: list[int]
    b_index: list[int]
    a: torch.Tensor  # (k_A, r', q): shared A's in Q coordinates
    B: torch.Tensor  # (k_B, d_out, r')
    history: list[float] = field(default_factory=list)  # objective after each ALS step


def _group_sum(values: torch.Tensor, index: list[int], k: int) -> torch.Tensor:
    out = torch.zeros((k, *values.shape[1:]), dtype=values.dtype)
    return out.index_add_(0, torch.tensor(index), values)


def objective(fm: FactoredModule, w: torch.Tensor, sol: LayoutSolution) -> torch.Tensor:
    """Per-task weighted squared errors (T,), from r x r' traces only."""
    ag, Bh = sol.a[sol.a_index], sol.B[sol.b_index]
    cross = ((fm.B.transpose(1, 2) @ Bh) * (fm.a @ ag.transpose(1, 2))).sum((1, 2))
    own = ((Bh.transpose(1, 2) @ Bh) * (ag @ ag.transpose(1, 2))).sum((1, 2))
    return w * (fm.sq_norms - 2 * cross + own).clamp_min(0)


def _solve_B(fm: FactoredModule, w: torch.Tensor, a: torch.Tensor, a_index: list[int], b_index: list[int], k_b: int) -> torch.Tensor:
    ag = a[a_index]  # (T, r', q)
    num = w.view(-1, 1, 1) * (fm.B @ (fm.a @ ag.transpose(1, 2)))  # (T, d_out, r')
    den = w.view(-1, 1, 1) * (ag @ ag.transpose(1, 2))  # (T, r', r')
    return _group_sum(num, b_index, k_b) @ torch.linalg.pinv(_group_sum(den, b_index, k_b), hermitian=True)


def _solve_a(fm: FactoredModule, w: torch.Tensor, B: torch.Tensor, a_index: list[int], b_index: list[int], k_a: int) -> torch.Tensor:
    Bh = B[b_index]  # (T, d_out, r')
    num = w.view(-1, 1, 1) * ((Bh.transpose(1, 2) @ fm.B) @ fm.a)  # (T, r', q)
    den = w.view(-1, 1, 1) * (Bh.transpose(1, 2) @ Bh)
    return torch.linalg.pinv(_group_sum(den, a_index, k_a), hermitian=True) @ _group_sum(num, a_index, k_a)


def solve_layout(
    fm: FactoredModule,
    weights: torch.Tensor,
    a_index: list[int],
    b_index: list[int],
    rank: int,
    max_iters: int = 25,
    tol: float = 1e-6,
) -> LayoutSolution:
    """Best shared factors for one grouping (closed-form start, then ALS)."""
    w = weights.to(DTYPE)
    k_a, k_b = max(a_index) + 1, max(b_index) + 1
    a = torch.stack([fm.top_row_space([t for t, g in enumerate(a_index) if g == grp], w, rank) for grp in range(k_a)])
    B = _solve_B(fm, w, a, a_index, b_index, k_b)
    sol = LayoutSolution(list(a_index), list(b_index), a, B)
    sol.history.append(float(objective(fm, w, sol).sum()))
    closed_form = k_a == 1 and k_b == fm.n_tasks
    exact = k_a == k_b == fm.n_tasks and rank >= fm.a.shape[1]
    if closed_form or exact:
        return sol
    for _ in range(max_iters):
        sol.a = _solve_a(fm, w, sol.B, a_index, b_index, k_a)
        sol.B = _solve_B(fm, w, sol.a, a_index, b_index, k_b)
        sol.history.append(float(objective(fm, w, sol).sum()))
        prev, cur = sol.history[-2], sol.history[-1]
        if prev - cur <= tol * max(prev, 1e-30):
            break
    return sol


def fit_stored(fm: FactoredModule, weights: torch.Tensor, sol: LayoutSolution, fmt: NumberFormat) -> tuple[MergedModule, torch.Tensor]:
    """Quantise A^, re-fit B^ to the stored A^, quantise B^. Returns the module and per-task
    weighted squared errors of what is actually stored."""
    w = weights.to(DTYPE)
    A_full = sol.a @ fm.Q.T  # (k_A, r', d_in)
    A_st = [StoredFactor.encode(A_full[g].float(), fmt, transposed=False) for g in range(A_full.shape[0])]
    Aq = torch.stack([s.values() for s in A_st]).to(DTYPE)
    a_q = Aq @ fm.Q  # coordinates inside span(Q); the rest of Aq is orthogonal to every dW_t
    k_b = max(sol.b_index) + 1
    B = _solve_refit_B(fm, w, Aq, a_q, sol.a_index, sol.b_index, k_b)
    B_st = [StoredFactor.encode(B[h].float(), fmt, transposed=True) for h in range(k_b)]
    Bq = torch.stack([s.values() for s in B_st]).to(DTYPE)
    stored = LayoutSolution(sol.a_index, sol.b_index, a_q, Bq)
    err = objective(fm, w, stored)
    # the part of Aq outside span(Q) only adds ||Bq Aq_perp||^2
    perp = _perp_gram(Aq, fm.Q)
    err = err + w * ((Bq[sol.b_index].transpose(1, 2) @ Bq[sol.b_index]) * perp[sol.a_index]).sum((1, 2))
    module = MergedModule(shape=fm.shape, a_index=sol.a_index, b_index=sol.b_index, A=A_st, B=B_st)
    return module, err


def _perp_gram(Aq: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Gram matrices (k, r', r') of the rows of Aq projected off span(Q)."""
    a_q = Aq @ Q
    return Aq @ Aq.transpose(1, 2) - a_q @ a_q.transpose(1, 2)


def _solve_refit_B(
    fm: FactoredModule, w: torch.Tensor, Aq: torch.Tensor, a_q: torch.Tensor, a_index: list[int], b_index: list[int], k_b: int
) -> torch.Tensor:
    """B-step against the stored (dequantised) A's, using their full Gram (inside and outside span Q)."""
    ag, full = a_q[a_index], Aq[a_index]
    num = w.view(-1, 1, 1) * (fm.B @ (fm.a @ ag.transpose(1, 2)))
    den = w.view(-1, 1, 1) * (full @ full.transpose(1, 2))
    return _group_sum(num, b_index, k_b) @ torch.linalg.pinv(_group_sum(den, b_index, k_b), hermitian=True)
