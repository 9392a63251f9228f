"""HydraOpt: shared factors plus per-task tensors, solved in the factored space (METHOD.md).

For one module and a layout (A-grouping ``a_index``, B-grouping ``b_index``, shared rank r'), the
objective is ``sum_t w_t ||dW_t - B^_{b(t)} A^_{a(t)}||_F^2``.

Closed forms cover the layouts the planner walks through:
- one shared A (k_A = 1), any B-grouping: with A's rows orthonormal, each group's best B is
  ``M_h A^T / W_h`` (``M_h = sum_{t in h} w_t dW_t``), so the best A spans the top right singular
  vectors of the stacked ``M_h / sqrt(W_h)``; METHOD.md's k_B = T case is the special case.
- a B per task (k_B = T), any A-grouping: each A-group independently, from its stacked ``sqrt(w_t) dW_t``.
The singular values give the error of every rank r' at once. Other groupings start from the
per-A-group closed form and run alternating least squares, each step an exact least-squares
solve, so the objective never increases. ``fit_stored`` quantises A^, re-fits B^ to the stored A^
(which recovers part of the quantisation error), then quantises B^.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hydraopt_mobile.bank import MergedModule
from hydraopt_mobile.factored import DTYPE, FactoredModule, unwhiten, whitened
from hydraopt_mobile.formats import NumberFormat, StoredFactor


@dataclass
class LayoutSolution:
    a_index: list[int]
    b_index: list[int]
    a: torch.Tensor  # (k_A, r', q): shared A's in Q coordinates
    B: torch.Tensor  # (k_B, d_out, r')
    history: list[float] = field(default_factory=list)  # objective after each step


def _members(index: list[int], g: int) -> list[int]:
    return [t for t, x in enumerate(index) if x == g]


def _group_sum(values: torch.Tensor, index: list[int], k: int) -> torch.Tensor:
    out = torch.zeros((k, *values.shape[1:]), dtype=values.dtype)
    return out.index_add_(0, torch.tensor(index), values)


def _stacked_rows(fm: FactoredModule, w: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Rows X with X^T X = sum_h M_h^T M_h / W_h, M_h = sum_{t in h} w_t B_t a_t (Q coordinates)."""
    blocks = []
    for h in groups:
        if len(h) == 1:
            blocks.append(fm.RA[h[0]] * w[h[0]].sqrt())
            continue
        S = torch.cat([fm.B[t] * w[t] for t in h], dim=1)  # (d_out, |h| r)
        R = torch.linalg.qr(S, mode="r")[1]
        blocks.append(R @ torch.cat([fm.a[t] for t in h], dim=0) / w[h].sum().sqrt())
    return torch.cat(blocks, dim=0)


def row_spaces(fm: FactoredModule, w: torch.Tensor, a_index: list[int], b_index: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per A-group: right singular vectors (all of them) and squared singular values of the rows
    whose top singular vectors are the closed-form A (one SVD serves every rank r')."""
    k_a, k_b = max(a_index) + 1, max(b_index) + 1
    if k_a == 1:
        groups = [[_members(b_index, h) for h in range(k_b)]]
    elif k_b == fm.n_tasks:
        groups = [[[t] for t in _members(a_index, g)] for g in range(k_a)]
    else:
        raise ValueError("closed form needs k_A = 1 or k_B = T")
    return _batched_svd([_stacked_rows(fm, w, g) for g in groups])


def _batched_svd(blocks: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right singular vectors (rows, descending) and squared singular values of each block.

    Computed from the eigendecomposition of the smaller Gram matrix, batched over blocks
    zero-padded to the same height (padding leaves both unchanged): several times faster than an
    SVD of the 640 x 640 blocks that 40 rank-16 tasks give, and exact enough for ranking ranks."""
    height = max(b.shape[0] for b in blocks)
    X = torch.zeros(len(blocks), height, blocks[0].shape[1], dtype=DTYPE)
    for i, b in enumerate(blocks):
        X[i, : b.shape[0]] = b
    if height >= X.shape[2]:
        lam, V = torch.linalg.eigh(X.transpose(1, 2) @ X)
        vh = V.flip(2).transpose(1, 2)
    else:
        lam, U = torch.linalg.eigh(X @ X.transpose(1, 2))
        U = U.flip(2)
        vh = U.transpose(1, 2) @ X
        norms = vh.norm(dim=2, keepdim=True)
        vh = torch.where(norms > 1e-12 * norms.amax(dim=1, keepdim=True).clamp_min(1e-300), vh / norms.clamp_min(1e-300), torch.zeros_like(vh))
    lam = lam.flip(1).clamp_min(0)
    return [(vh[i].to(DTYPE), lam[i].to(DTYPE)) for i in range(len(blocks))]


def closed_form_errors(fm: FactoredModule, w: torch.Tensor, spaces: list[tuple[torch.Tensor, torch.Tensor]], ranks: list[int]) -> dict[int, float]:
    """Weighted squared error of the closed-form layout at each rank, from singular values only."""
    total = float((w * fm.sq_norms).sum())
    return {r: max(total - sum(float(s2[:r].sum()) for _, s2 in spaces), 0.0) for r in ranks}


def _truncate(vh: torch.Tensor, s2: torch.Tensor, rank: int) -> torch.Tensor:
    keep = min(rank, int((s2 > s2[0] * 1e-20).sum())) if s2.numel() and s2[0] > 0 else 0
    out = torch.zeros(rank, vh.shape[1], dtype=vh.dtype)
    out[:keep] = vh[:keep]
    return out


def _metric(fm: FactoredModule, ag: torch.Tensor) -> torch.Tensor:
    """``a S_t`` per task with calibration (the data-aware inner product in Q coordinates), else ``a``."""
    return ag if fm.S is None else ag @ fm.S


def objective(fm: FactoredModule, w: torch.Tensor, sol: LayoutSolution) -> torch.Tensor:
    """Per-task weighted squared errors (T,), from r x r' traces only: ``||dW_t - dW^_t||^2``, or
    with calibration ``tr(E_t S_t E_t^T)`` (E_t in Q coordinates)."""
    w = w.to(DTYPE)
    ag, Bh = sol.a[sol.a_index], sol.B[sol.b_index]
    agS = _metric(fm, ag)
    cross = ((fm.B.transpose(1, 2) @ Bh) * (fm.a @ agS.transpose(1, 2))).sum((1, 2))
    own = ((Bh.transpose(1, 2) @ Bh) * (ag @ agS.transpose(1, 2))).sum((1, 2))
    return w * (fm.sq_norms - 2 * cross + own).clamp_min(0)


def solve_B(fm: FactoredModule, w: torch.Tensor, a: torch.Tensor, a_index: list[int], b_index: list[int], k_b: int, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares B's for fixed A's (``gram``: A Gram matrices if A has parts outside span Q;
    with calibration that part is weighted by ``fm.outside``)."""
    ag = a[a_index]
    agS = _metric(fm, ag)
    num = w.view(-1, 1, 1) * (fm.B @ (fm.a @ agS.transpose(1, 2)))  # (T, d_out, r')
    if gram is None:
        inner = ag @ agS.transpose(1, 2)
    elif fm.S is None:
        inner = gram[a_index]
    else:
        inner = ag @ agS.transpose(1, 2) + fm.outside.view(-1, 1, 1) * (gram - a @ a.transpose(1, 2))[a_index]
    den = w.view(-1, 1, 1) * inner
    return _group_sum(num, b_index, k_b) @ torch.linalg.pinv(_group_sum(den, b_index, k_b), hermitian=True)


def solve_a(fm: FactoredModule, w: torch.Tensor, B: torch.Tensor, a_index: list[int], b_index: list[int], k_a: int) -> torch.Tensor:
    """Least-squares A's for fixed B's, in Q coordinates (the best A lies in the tasks' row space)."""
    Bh = B[b_index]
    num = w.view(-1, 1, 1) * ((Bh.transpose(1, 2) @ fm.B) @ fm.a)  # (T, r', q)
    den = w.view(-1, 1, 1) * (Bh.transpose(1, 2) @ Bh)
    return torch.linalg.pinv(_group_sum(den, a_index, k_a), hermitian=True) @ _group_sum(num, a_index, k_a)


def _solve_a_calibrated(fm: FactoredModule, w: torch.Tensor, B: torch.Tensor, a0: torch.Tensor, a_index: list[int], b_index: list[int], k_a: int, iters: int = 60, tol: float = 1e-9) -> torch.Tensor:
    """Least-squares A's for fixed B's under the data-aware objective: per A-group the normal
    equations ``sum_t G_t a S_t = C`` (G_t = w_t B^_t^T B^_t), a Kronecker sum that has no small closed
    form, solved by conjugate gradients from ``a0`` preconditioned by ``(sum G_t)^-1 . (mean S)^-1``.
    CG from ``a0`` minimises the quadratic over a growing subspace that contains ``a0``, so the
    objective never increases, however few steps it takes."""
    Bh = B[b_index]
    G = w.view(-1, 1, 1) * (Bh.transpose(1, 2) @ Bh)  # (T, r', r')
    C = _group_sum(w.view(-1, 1, 1) * ((Bh.transpose(1, 2) @ fm.B) @ fm.a @ fm.S), a_index, k_a)

    def op(a: torch.Tensor) -> torch.Tensor:
        return _group_sum(G @ a[a_index] @ fm.S, a_index, k_a)

    tg = torch.diagonal(G, dim1=1, dim2=2).sum(1).view(-1, 1, 1)
    G_inv = torch.linalg.pinv(_group_sum(G, a_index, k_a), hermitian=True)
    S_inv = torch.linalg.pinv(_group_sum(tg * fm.S, a_index, k_a), hermitian=True)
    x = a0.clone()
    r = C - op(x)
    z = G_inv @ r @ S_inv
    p, rz = z, float((r * z).sum())
    scale = float(C.norm()) or 1.0
    for _ in range(iters):
        if float(r.norm()) <= tol * scale or rz <= 0:
            break
        Ap = op(p)
        curvature = float((p * Ap).sum())
        if curvature <= 0:
            break
        alpha = rz / curvature
        x, r = x + alpha * p, r - alpha * Ap
        z = G_inv @ r @ S_inv
        rz_next = float((r * z).sum())
        p, rz = z + (rz_next / rz) * p, rz_next
    return x


def solve_layout(
    fm: FactoredModule,
    weights: torch.Tensor,
    a_index: list[int],
    b_index: list[int],
    rank: int,
    max_iters: int = 25,
    tol: float = 1e-6,
    spaces: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    white: FactoredModule | None = None,
) -> LayoutSolution:
    """Best shared factors for one grouping: closed form where it exists, else ALS from the
    per-A-group start. ``spaces`` (from :func:`row_spaces`) saves recomputing the SVDs.

    With calibration (``fm.S``) no grouping has a closed form: the data-free solution in
    coordinates whitened by the mean moment (``white``, factored.whitened; ``spaces`` then belong
    to it) is the start, and ALS on the data-aware objective follows for every grouping."""
    w = weights.to(DTYPE)
    k_a, k_b = max(a_index) + 1, max(b_index) + 1
    if fm.S is not None:
        white = white if white is not None else whitened(fm, w)
        a = unwhiten(white, solve_layout(white, w, a_index, b_index, rank, max_iters, tol, spaces).a)
    else:
        if spaces is None:
            start_b = b_index if k_a == 1 else list(range(fm.n_tasks))
            spaces = row_spaces(fm, w, a_index, start_b)
        a = torch.stack([_truncate(vh, s2, rank) for vh, s2 in spaces])
    sol = LayoutSolution(list(a_index), list(b_index), a, solve_B(fm, w, a, a_index, b_index, k_b))
    sol.history.append(float(objective(fm, w, sol).sum()))
    if fm.S is None and (k_a == 1 or k_b == fm.n_tasks):
        return sol
    for _ in range(max_iters):
        if fm.S is None:
            sol.a = solve_a(fm, w, sol.B, a_index, b_index, k_a)
        else:
            sol.a = _solve_a_calibrated(fm, w, sol.B, sol.a, a_index, b_index, k_a)
        sol.B = solve_B(fm, w, sol.a, a_index, b_index, k_b)
        sol.history.append(float(objective(fm, w, sol).sum()))
        prev, cur = sol.history[-2], sol.history[-1]
        if prev - cur <= tol * max(prev, 1e-30):
            break
    return sol


def fit_stored(fm: FactoredModule, weights: torch.Tensor, sol: LayoutSolution, fmt: NumberFormat) -> tuple[MergedModule, torch.Tensor]:
    """Quantise A^, re-fit B^ to the stored A^, quantise B^. Returns the module and the per-task
    weighted squared errors of exactly what is stored."""
    w = weights.to(DTYPE)
    A_full = sol.a @ fm.Q.T  # (k_A, r', d_in)
    A_st = [StoredFactor.encode(A_full[g].float(), fmt, transposed=False) for g in range(A_full.shape[0])]
    Aq = torch.stack([s.values() for s in A_st]).to(DTYPE)
    a_q = Aq @ fm.Q  # coordinates inside span(Q); the rest of Aq is orthogonal to every dW_t
    gram = Aq @ Aq.transpose(1, 2)
    k_b = max(sol.b_index) + 1
    B = solve_B(fm, w, a_q, sol.a_index, sol.b_index, k_b, gram=gram)
    B_st = [StoredFactor.encode(B[h].float(), fmt, transposed=True) for h in range(k_b)]
    Bq = torch.stack([s.values() for s in B_st]).to(DTYPE)
    module = MergedModule(shape=fm.shape, a_index=sol.a_index, b_index=sol.b_index, A=A_st, B=B_st)
    return module, _stored_error(fm, w, sol.a_index, sol.b_index, Aq, Bq)


def stored_error(fm: FactoredModule, weights: torch.Tensor, module: MergedModule) -> torch.Tensor:
    """Per-task weighted squared errors of the factors ``module`` stores (ranks zero-padded alike)."""
    r = max(module.rank, *(f.shape[0] for f in module.A))
    A = torch.zeros(len(module.A), r, fm.shape[1], dtype=DTYPE)
    B = torch.zeros(len(module.B), fm.shape[0], r, dtype=DTYPE)
    for i, f in enumerate(module.A):
        A[i, : f.shape[0]] = f.values().to(DTYPE)
    for i, f in enumerate(module.B):
        B[i, :, : f.shape[1]] = f.values().to(DTYPE)
    return _stored_error(fm, weights.to(DTYPE), module.a_index, module.b_index, A, B)


def _stored_error(fm: FactoredModule, w: torch.Tensor, a_index: list[int], b_index: list[int], Aq: torch.Tensor, Bq: torch.Tensor) -> torch.Tensor:
    a_q = Aq @ fm.Q
    err = objective(fm, w, LayoutSolution(a_index, b_index, a_q, Bq))
    # the part of Aq outside span(Q) adds ||Bq Aq_perp||^2 (with calibration, times S_t's mean eigenvalue there)
    perp = Aq @ Aq.transpose(1, 2) - a_q @ a_q.transpose(1, 2)
    outside = w * ((Bq[b_index].transpose(1, 2) @ Bq[b_index]) * perp[a_index]).sum((1, 2))
    return err + (outside if fm.outside is None else outside * fm.outside)


def quantisation_noise(fm: FactoredModule, weights: torch.Tensor, fmt: NumberFormat, sol: LayoutSolution) -> float:
    """Relative error that storing ``sol`` in ``fmt`` adds (used to rank candidates; the planner
    measures the candidates it may pick exactly)."""
    _, err = fit_stored(fm, weights, sol, fmt)
    total = float((weights.to(DTYPE) * fm.sq_norms).sum())
    fitted = max(total - sol.history[-1], 1e-30)
    return max(float(err.sum()) - sol.history[-1], 0.0) / fitted
