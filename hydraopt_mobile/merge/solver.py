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
from typing import Iterator

import torch

from hydraopt_mobile.bank import MergedModule
from hydraopt_mobile.factored import DTYPE, FactoredModule, unwhiten, whitened
from hydraopt_mobile.formats import NumberFormat, StoredFactor
from hydraopt_mobile.lapack import eigh_top, lower_triangular_product
from hydraopt_mobile.lapack import gram as gram_of  # "gram" names the A Grams here


@dataclass
class LayoutSolution:
    a_index: list[int]
    b_index: list[int]
    a: torch.Tensor  # (k_A, r', q): shared A's in Q coordinates
    B: torch.Tensor  # (k_B, d_out, r')
    history: list[float] = field(default_factory=list)  # objective after each step
    A_coef: list[tuple[list[int], torch.Tensor]] | None = None  # per A-group: A^_g = K_g [A_t; t in members] (see row_spaces)


@dataclass
class RowSpace:
    """One A-group's closed form: the top right singular vectors ``vh`` (rows, descending, in Q
    coordinates) and squared singular values ``s2`` of its stacked rows ``X = L [a_t; t in members]``;
    ``coef`` (when ``X`` had fewer rows than q) maps them to d_in without Q: ``vh = coef X``, so
    ``vh Q^T = coef L [A_t; t in members]``."""

    vh: torch.Tensor
    s2: torch.Tensor
    members: list[int]
    coef: torch.Tensor | None  # (k, |members| r): coef L


def _members(index: list[int], g: int) -> list[int]:
    return [t for t, x in enumerate(index) if x == g]


def _group_sum(values: torch.Tensor, index: list[int], k: int) -> torch.Tensor:
    out = torch.zeros((k, *values.shape[1:]), dtype=values.dtype)
    return out.index_add_(0, torch.tensor(index), values)


def _stacked_rows(fm: FactoredModule, w: torch.Tensor, groups: list[list[int]]) -> tuple[list[int], list[torch.Tensor], torch.Tensor]:
    """``(members, blocks, X)`` with ``X = blockdiag(blocks) [a_t; t in members]`` and
    ``X^T X = sum_h M_h^T M_h / W_h``, ``M_h = sum_{t in h} w_t B_t a_t`` (Q coordinates).

    ``M_h^T M_h = C_h^T S_h^T S_h C_h`` with ``S_h = [w_t B_t]``, ``C_h = [a_t]`` stacked over
    ``t in h``; with ``S_h = U_h R_h`` (QR, R_h at most |h| r square), ``M_h^T M_h = (R_h C_h)^T
    (R_h C_h)``: only R_h is needed. For one task it is sqrt(w_t) times B_t's own R (``fm.R``)."""
    members = [t for h in groups for t in h]
    if all(len(h) == 1 for h in groups):
        sw = w[members].sqrt().view(-1, 1, 1)
        return members, list(fm.R[members] * sw), (fm.RA[members] * sw).reshape(-1, fm.q)
    r = fm.a.shape[1]
    blocks = []
    for h in groups:
        if len(h) == 1:
            blocks.append(fm.R[h[0]] * w[h[0]].sqrt())
        else:
            blocks.append(torch.linalg.qr(torch.cat([fm.B[t] * w[t] for t in h], dim=1), mode="r")[1] / w[h].sum().sqrt())
    X = torch.cat([R @ fm.a[h].reshape(len(h) * r, -1) for h, R in zip(groups, blocks)])
    return members, blocks, X


def _shared_a_gram(fm: FactoredModule, w: torch.Tensor, groups: list[list[int]], b_gram: torch.Tensor) -> torch.Tensor:
    """``X^T X`` of :func:`_stacked_rows` without the B-groups' QRs: ``sum_h C_h^T (S_h^T S_h) C_h / W_h``
    with ``S_h^T S_h = [w_t w_u B_t^T B_u]``, a block of the module's B Gram ``b_gram``
    (factored.b_gram, (T, r, T, r)). The QR of S_h (d_out x |h| r) costs what the Gram of all
    B's does, once per B-grouping; the Gram is computed once per module (the similarity needs it too).

    With the stacked ``a`` square, hence lower triangular (``FactoredModule.square_a``), the sum is
    ``a^T (M a)``, ``M`` block-diagonal over the groups (``S_h^T S_h / W_h`` on group h's rows and
    columns): each group gives its rows of ``M a`` (``G_h C_h / W_h``), and the products with the
    triangular ``a`` (``a^T`` always, ``a`` too for one group of all tasks) take BLAS ``trmm``,
    half the flops of a general product (lapack.py)."""
    r, q = fm.a.shape[1], fm.q
    square = fm.square_a
    a = fm.a.reshape(-1, q)
    out = torch.zeros(q, q, dtype=DTYPE)
    for h in groups:
        idx = torch.tensor(h)
        wh = w[idx]
        G = (b_gram[idx][:, :, idx] * (wh.view(-1, 1, 1, 1) * wh.view(1, 1, -1, 1))).reshape(len(h) * r, len(h) * r)
        if not square:
            C = fm.a[idx].reshape(len(h) * r, q)
            out += C.T @ (G @ C) / wh.sum()
        elif h == list(range(fm.n_tasks)):
            out = lower_triangular_product(a, G, alpha=1.0 / float(wh.sum()), L_on_left=False)  # M a, M = G / W
        else:
            rows = (idx.view(-1, 1) * r + torch.arange(r)).reshape(-1)
            out[rows] = G @ a[rows] / wh.sum()
    return lower_triangular_product(a, out, transpose_L=True) if square else out


def row_spaces(fm: FactoredModule, w: torch.Tensor, a_index: list[int], b_index: list[int], top: int, b_gram: torch.Tensor | None = None) -> list[RowSpace]:
    """Per A-group, the ``top`` right singular vectors and squared singular values of the rows
    whose top singular vectors are the closed-form A (one decomposition serves every rank up to ``top``).
    ``b_gram`` (factored.b_gram of ``fm.B``): a shared A over B-groups of several tasks is then
    decomposed from :func:`_shared_a_gram` where the rows span all of Q (else the rows are needed)."""
    k_a, k_b = max(a_index) + 1, max(b_index) + 1
    if k_a == 1:
        groups = [[_members(b_index, h) for h in range(k_b)]]
        d_out, r = fm.shape[0], fm.a.shape[1]
        if b_gram is not None and k_b < fm.n_tasks and sum(min(d_out, len(h) * r) for h in groups[0]) >= fm.q:
            lam, V = _top_eigh(_shared_a_gram(fm, w.to(DTYPE), groups[0], b_gram).unsqueeze(0), top)
            return [RowSpace(V[0].T.contiguous(), lam[0].clamp_min(0), [t for h in groups[0] for t in h], None)]
    elif k_b == fm.n_tasks:
        groups = [[[t] for t in _members(a_index, g)] for g in range(k_a)]
    else:
        raise ValueError("closed form needs k_A = 1 or k_B = T")
    return _top_singular([_stacked_rows(fm, w.to(DTYPE), g) for g in groups], fm, top)


def _top_eigh(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenvalues (G, k), descending, and their eigenvectors (G, n, k) of
    symmetric matrices (G, n, n). One large matrix goes to LAPACK's ``syevr`` for just those ``k``
    (its tridiagonal reduction then dominates); small or batched ones to one full ``eigh``."""
    n = gram.shape[-1]
    k = min(k, n)
    if gram.shape[0] == 1 and n >= 128 and n > 4 * k:
        lam, V = eigh_top(gram[0].numpy(), k)  # scipy's syevr, releasing the GIL (lapack.py)
        return torch.from_numpy(lam[::-1].copy()).unsqueeze(0), torch.from_numpy(V[:, ::-1].copy()).unsqueeze(0)
    lam, V = torch.linalg.eigh(gram)
    return lam.flip(-1)[..., :k], V.flip(-1)[..., :k]


def _top_singular(blocks: list[tuple[list[int], list[torch.Tensor], torch.Tensor]], fm: FactoredModule, top: int) -> list[RowSpace]:
    """Top right singular vectors (rows, descending) and squared singular values of each block
    ``X = L a[members]``, from the eigendecomposition of the smaller of ``X^T X`` and ``X X^T`` (of one block by BLAS
    ``syrk``, lapack.gram; of many small ones by one batched product).

    Through ``X X^T = U diag(lam) U^T``: ``vh = diag(lam)^(-1/2) U^T X`` (rows of zero ``lam``
    set to 0), i.e. ``coef = diag(lam)^(-1/2) U^T L`` on the members' own A's. Blocks of equal
    shape (with a B per task, one block per A-group) are decomposed in one batched call."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (members, _, x) in enumerate(blocks):
        by_shape.setdefault((x.shape[0], len(members)), []).append(i)
    out: dict[int, RowSpace] = {}
    for (height, _), ids in by_shape.items():
        Xs = torch.stack([blocks[i][2] for i in ids])
        if height >= fm.q:
            lam, V = _top_eigh(gram_of(Xs[0]).unsqueeze(0) if len(ids) == 1 else Xs.transpose(1, 2) @ Xs, top)
            out.update({i: RowSpace(V[j].T.contiguous(), lam[j].clamp_min(0), blocks[i][0], None) for j, i in enumerate(ids)})
            continue
        lam, U = _top_eigh(gram_of(Xs[0], rows=True).unsqueeze(0) if len(ids) == 1 else Xs @ Xs.transpose(1, 2), top)
        Ut = U.transpose(1, 2)
        vh = Ut @ Xs
        norms = vh.norm(dim=2, keepdim=True)
        keep = norms > 1e-12 * norms.amax(dim=1, keepdim=True).clamp_min(1e-300)
        scale = torch.where(keep, 1 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        coef = (Ut * scale) @ torch.stack([torch.block_diag(*blocks[i][1]) for i in ids])
        out.update({i: RowSpace(vh[j] * scale[j], lam[j].clamp_min(0), blocks[i][0], coef[j]) for j, i in enumerate(ids)})
    return [out[i] for i in range(len(blocks))]


def closed_form_errors(fm: FactoredModule, w: torch.Tensor, spaces: list[RowSpace], ranks: list[int]) -> dict[int, float]:
    """Weighted squared error of the closed-form layout at each rank, from singular values only."""
    total = float((w * fm.sq_norms).sum())
    top = max(max(ranks, default=0), 1)
    s2 = torch.zeros(len(spaces), top, dtype=torch.float64)
    for i, s in enumerate(spaces):
        s2[i, : min(top, s.s2.numel())] = s.s2[:top].double()
    kept = s2.cumsum(1).sum(0)  # kept[r - 1]: what rank r keeps, summed over the A-groups
    return {r: max(total - float(kept[r - 1]), 0.0) for r in ranks}


def _truncate(rows: torch.Tensor, s2: torch.Tensor, rank: int) -> torch.Tensor:
    """The first ``rank`` rows of ``rows`` whose singular value is not zero; zero rows after them."""
    keep = min(rank, int((s2 > s2[0] * 1e-20).sum())) if s2.numel() and s2[0] > 0 else 0
    out = torch.zeros(rank, rows.shape[1], dtype=rows.dtype)
    out[:keep] = rows[:keep]
    return out


def _errors(B: torch.Tensor, sq_norms: torch.Tensor, w: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, a_index: list[int], Bh: torch.Tensor, b_index: list[int] | None) -> torch.Tensor:
    """Per-task ``w_t ||B_t A_t - B^ A^||^2 = w_t (||dW_t||^2 - 2 tr((B_t^T B^) (A_t A^^T)) +
    tr((B^^T B^) (A^ A^^T)))`` from the tasks' ``B`` (T, d_out, r), ``sq_norms`` (``||dW_t||^2``),
    ``cross[t] = A_t A^_{a(t)}^T`` (T, r, r'), ``gram[g] = A^_g A^_g^T`` and the fitted B's ``Bh``
    (k_B, d_out, r'), ``Bh[b_index[t]]`` task t's (``b_index`` None: one per task, in order): r x r'
    traces only. A B^ of a group takes one product with all of its tasks' B's and its own Gram once
    (no copy of it per task), the same for a group however the tasks are split into calls. With
    calibration the same traces in the data-aware inner product (:func:`_products`)."""
    T = B.shape[0]
    if b_index is None:
        c = ((B.transpose(1, 2) @ Bh) * cross).sum((1, 2))
        own = ((Bh.transpose(1, 2) @ Bh) * gram[a_index]).sum((1, 2))
    else:
        own = ((Bh.transpose(1, 2) @ Bh)[b_index] * gram[a_index]).sum((1, 2))
        c = torch.empty(T, dtype=B.dtype)
        for h in sorted(set(b_index)):
            tasks = [t for t, g in enumerate(b_index) if g == h]
            c[tasks] = ((Bh[h].T @ _take(B, tasks)) * cross[tasks].transpose(1, 2)).sum((1, 2))  # (B^_h^T B_t) against (A_t A^^T)^T
    return w * (sq_norms - 2 * c + own).clamp_min(0)


def _groups_or_none(b_index: list[int]) -> list[int] | None:
    """``b_index`` as :func:`_errors` takes it: None for a B per task."""
    return None if b_index == list(range(len(b_index))) else b_index


def _products(fm: FactoredModule, a: torch.Tensor, a_index: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(cross, gram, index)`` for shared A's in Q coordinates, as :func:`_errors` and
    :func:`_solve_B` take them: ``cross[t] = a_t a^_{a(t)}^T`` and ``gram[g] = a^_g a^_g^T`` per
    A-group (``index = a_index``); with calibration ``cross[t] = a_t S_t a^_{a(t)}^T`` and
    ``gram[t] = a^_{a(t)} S_t a^_{a(t)}^T`` per task (``index`` = every task its own)."""
    ag = a[a_index]
    if fm.S is None:
        return fm.a @ ag.transpose(1, 2), a @ a.transpose(1, 2), a_index
    agS = ag @ fm.S
    return fm.a @ agS.transpose(1, 2), ag @ agS.transpose(1, 2), list(range(fm.n_tasks))


def objective(fm: FactoredModule, w: torch.Tensor, sol: LayoutSolution) -> torch.Tensor:
    """Per-task weighted squared errors (T,) of a solution in Q coordinates: ``||dW_t - dW^_t||^2``,
    or with calibration ``tr(E_t S_t E_t^T)`` (E_t in Q coordinates)."""
    return _errors(fm.B, fm.sq_norms, w.to(DTYPE), *_products(fm, sol.a, sol.a_index), sol.B, _groups_or_none(sol.b_index))


def _solve_B(B: torch.Tensor, w: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, a_index: list[int], b_index: list[int], k_b: int) -> torch.Tensor:
    """Least-squares B's for fixed A's: ``B^_h = (sum_{t in h} w_t B_t A_t A^^T)(sum_{t in h} w_t A^ A^^T)^+``
    with the tasks' ``B`` (T, d_out, r), ``cross[t] = A_t A^_{a(t)}^T`` and ``gram[g] = A^_g A^_g^T``.
    With a B per task the weight cancels, ``B^_t = B_t cross_t gram_{a(t)}^+``: one pseudo-inverse per
    A-group these tasks use (a caller passing a few tasks at a time inverts only their groups').

    Computed as ``B^^T`` (contiguous, returned transposed): its rows are the component vectors a
    number format encodes (``StoredFactor.quantise_stack`` then needs no copy)."""
    Bt = B.transpose(1, 2)
    if k_b == B.shape[0] and b_index == list(range(k_b)):
        return (_own_coef(cross, gram, a_index).transpose(1, 2) @ Bt).transpose(1, 2)
    num = torch.zeros(k_b, cross.shape[2], B.shape[1], dtype=B.dtype)  # sum_{t in h} w_t (B_t cross_t)^T, a few tasks at a time
    for lo, hi in _runs(B.shape[0], 4 * cross.shape[2] * B.shape[1]):
        num.index_add_(0, torch.tensor(b_index[lo:hi]), w[lo:hi].view(-1, 1, 1) * (cross[lo:hi].transpose(1, 2) @ Bt[lo:hi]))
    den = w.view(-1, 1, 1) * gram[a_index]
    return (torch.linalg.pinv(_group_sum(den, b_index, k_b), hermitian=True).transpose(1, 2) @ num).transpose(1, 2)


def _own_coef(cross: torch.Tensor, gram: torch.Tensor, a_index: list[int]) -> torch.Tensor:
    """``K_t = cross_t gram_{a(t)}^+`` (T, r, r'): with a B per task, ``B^_t = B_t K_t``."""
    used = sorted(set(a_index))
    at = {g: i for i, g in enumerate(used)}
    return cross @ torch.linalg.pinv(gram[used], hermitian=True)[[at[g] for g in a_index]]


def _solve_B_coords(fm: FactoredModule, w: torch.Tensor, a: torch.Tensor, a_index: list[int], b_index: list[int], k_b: int) -> torch.Tensor:
    cross, gram, index = _products(fm, a, a_index)
    return _solve_B(fm.B, w, cross, gram, index, b_index, k_b)


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
    spaces: list[RowSpace] | None = None,
    with_B: bool = True,
    white: FactoredModule | None = None,
) -> LayoutSolution:
    """Best shared factors for one grouping: closed form where it exists, else ALS from the
    per-A-group start. ``spaces`` (from :func:`row_spaces`, with ``top >= rank``) saves
    recomputing the decompositions. ``with_B=False``: a closed form's float B's are left out
    (``B`` is then empty; :func:`fit_stored` fits B's to the stored A's itself).

    With calibration (``fm.S``) no grouping has a closed form: the data-free solution in
    coordinates whitened by the mean moment (``white``, factored.whitened; ``spaces`` then belong
    to it) is the start, and ALS on the data-aware objective follows for every grouping."""
    w = weights.to(DTYPE)
    k_a, k_b = max(a_index) + 1, max(b_index) + 1
    closed = fm.S is None and (k_a == 1 or k_b == fm.n_tasks)
    if fm.S is not None:
        white = white if white is not None else whitened(fm, w)
        a = unwhiten(white, solve_layout(white, w, a_index, b_index, rank, max_iters, tol, spaces, with_B=False).a)
    else:
        if spaces is None:
            start_b = b_index if k_a == 1 else list(range(fm.n_tasks))
            spaces = row_spaces(fm, w, a_index, start_b, rank)
        a = torch.stack([_truncate(s.vh, s.s2, rank) for s in spaces])
    B = _solve_B_coords(fm, w, a, a_index, b_index, k_b) if with_B or not closed else torch.empty(0)
    sol = LayoutSolution(list(a_index), list(b_index), a, B)
    if closed:  # the closed form's objective is what its singular values leave
        assert spaces is not None
        coef = [(s.members, _truncate(s.coef, s.s2, rank)) for s in spaces if s.coef is not None]
        sol.A_coef = coef if len(coef) == len(spaces) else None
        sol.history.append(closed_form_errors(fm, w, spaces, [rank])[rank])
        return sol
    sol.history.append(float(objective(fm, w, sol).sum()))
    sol.A_coef = None
    for _ in range(max_iters):
        if fm.S is None:
            sol.a = solve_a(fm, w, sol.B, a_index, b_index, k_a)
        else:
            sol.a = _solve_a_calibrated(fm, w, sol.B, sol.a, a_index, b_index, k_a)
        sol.B = _solve_B_coords(fm, w, sol.a, a_index, b_index, k_b)
        sol.history.append(float(objective(fm, w, sol).sum()))
        prev, cur = sol.history[-2], sol.history[-1]
        if prev - cur <= tol * max(prev, 1e-30):
            break
    return sol


def solve_B(fm: FactoredModule, w: torch.Tensor, A: torch.Tensor, a_index: list[int], b_index: list[int], k_b: int) -> torch.Tensor:
    """Least-squares B's for fixed A's given in d_in coordinates (k_A, r', d_in), parts outside
    span(Q) included (:func:`_stored_products`)."""
    cross, gram, index = _stored_products(fm, A.to(DTYPE), a_index)
    return _solve_B(fm.B, w.to(DTYPE), cross, gram, index, b_index, k_b)


def input_space_A(fm: FactoredModule, sol: LayoutSolution) -> torch.Tensor:
    """The shared A's in d_in coordinates (k_A, r', d_in): from each A-group's coefficients on its
    own tasks' A's when the closed form gave them (r' |g| r d_in flops per group, so a B per task
    costs what one shared A does), else ``a Q^T`` through the reflectors."""
    return fm.to_input_space(sol.a) if sol.A_coef is None else _from_coef(fm, sol.A_coef)


def _from_coef(fm: FactoredModule, A_coef: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """:func:`input_space_A` of the A-groups ``A_coef`` holds: ``A^_g = K_g [A_t; t in members]``."""
    sizes = {len(members) for members, _ in A_coef}
    if len(sizes) == 1:  # equal groups (one task per group included): one batched product
        stacked = _take(fm.A, [t for members, _ in A_coef for t in members]).reshape(len(A_coef), -1, fm.A.shape[2])
        return torch.stack([K for _, K in A_coef]) @ stacked
    return torch.stack([K @ _take(fm.A, members).reshape(-1, fm.A.shape[2]) for members, K in A_coef])


def _cross_input_space(fm: FactoredModule, A: torch.Tensor, a_index: list[int]) -> torch.Tensor:
    """``A_t A_{a(t)}^T`` (T, r, r') for A's in d_in coordinates: T r r' d_in flops."""
    T, r, d_in = fm.A.shape
    if A.shape[0] == 1:
        return (fm.A.reshape(T * r, d_in) @ A[0].T).reshape(T, r, -1)
    return fm.A @ A[a_index].transpose(1, 2)


def _stored_products(fm: FactoredModule, A: torch.Tensor, a_index: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """:func:`_products` for A's in d_in coordinates (k_A, r', d_in), parts outside span(Q)
    included. Data-free: exactly, from ``A_t A^T`` and ``A A^T`` in d_in coordinates (never Q
    coordinates). With calibration: the part inside span(Q) (``A Q``, through the reflectors) in
    the data-aware inner product, the part outside weighted by ``S_t``'s mean eigenvalue there
    (``fm.outside``; calibration.py)."""
    gram = A @ A.transpose(1, 2)
    if fm.S is None:
        return _cross_input_space(fm, A, a_index), gram, a_index
    a = fm.to_coords(A)
    cross, inside, index = _products(fm, a, a_index)
    perp = (gram - a @ a.transpose(1, 2))[a_index]
    return cross, inside + fm.outside.view(-1, 1, 1) * perp, index


@dataclass
class StoredA:
    """Shared A's as stored: the encoded factors and the products of the values they decode to
    with the tasks' A's (:func:`_stored_products`)."""

    factors: list[StoredFactor]
    cross: torch.Tensor
    gram: torch.Tensor
    index: list[int]

    def leading(self, rank: int, factors: bool = True) -> "StoredA":
        """The first ``rank`` rows of every A: formats encode A row by row, and every product here is
        bilinear in the rows, so this is what encoding the leading rows alone gives. A closed form's
        A's of rank r are the leading rows of its A's at any larger rank (``_truncate``), so one
        encoding at the top rank serves every rank of a layout. ``factors=False``: products only
        (for :func:`stored_errors`)."""
        factors = [StoredFactor(f.fmt, {part: t[:rank].clone() for part, t in f.data.items()}, (rank, f.shape[1]), f.transposed) for f in self.factors] if factors else []
        return StoredA(factors, self.cross[..., :rank], self.gram[:, :rank, :rank], self.index)


CHUNK_BYTES = 4 << 20
"""The most float32 bytes of fitted B's, or of encoded A's, handled at once. glibc serves a large
block by mmap (and trims a large free top of the heap), so freed memory goes back to the system and
the next block is faulted in again page by page: at Llama-3-8B shapes with 100 tasks one
candidate's B's are 183 MB, and the page faults cost more system time than the arithmetic (on one
layer of benchmarks/merge_speed_8b.py's adapters, 3.9 M minor faults whole, 1.2 M in 4 MB pieces)."""


def stored_A(fm: FactoredModule, sol: LayoutSolution, fmt: NumberFormat) -> StoredA:
    """``sol``'s A's in d_in coordinates, encoded in ``fmt``, with their products. A's from their
    groups' coefficients (data-free closed forms) are encoded and multiplied a few A-groups at a time
    (:data:`CHUNK_BYTES`): each group's A and products involve only its own tasks' A's."""
    k_a, r_out, d_in = sol.a.shape[0], sol.a.shape[1], fm.A.shape[2]
    per = max(1, CHUNK_BYTES // (4 * d_in * max(r_out, 1)))
    if sol.A_coef is None or fm.S is not None or k_a <= per:
        A_st, Aq = StoredFactor.encode_stack(input_space_A(fm, sol).float(), fmt, transposed=False)
        return StoredA(A_st, *_stored_products(fm, Aq, sol.a_index))
    factors: list[StoredFactor] = []
    cross = torch.zeros(fm.n_tasks, fm.A.shape[1], r_out, dtype=DTYPE)
    grams = []
    for g0 in range(0, k_a, per):
        chunk, Aq = StoredFactor.encode_stack(_from_coef(fm, sol.A_coef[g0 : g0 + per]).float(), fmt, transposed=False)
        factors += chunk
        tasks = [t for t, g in enumerate(sol.a_index) if g0 <= g < g0 + per]
        cross[tasks] = _take(fm.A, tasks) @ Aq[[sol.a_index[t] - g0 for t in tasks]].transpose(1, 2)
        grams.append(Aq @ Aq.transpose(1, 2))
    return StoredA(factors, cross, torch.cat(grams), list(sol.a_index))


def fit_stored(fm: FactoredModule, weights: torch.Tensor, sol: LayoutSolution, fmt: NumberFormat, stored: StoredA | None = None) -> tuple[MergedModule, torch.Tensor]:
    """Quantise A^ (or take ``stored``, ``sol``'s A's as :func:`stored_A` gives them), re-fit B^ to
    the stored A^, quantise B^. Returns the module and the per-task weighted squared errors of
    exactly what is stored (the stored A^'s parts outside span(Q) included, :func:`_stored_products`)."""
    return fit_to_stored(fm.B, fm.sq_norms, fm.b_grams, weights, sol.a_index, sol.b_index, fmt, stored if stored is not None else stored_A(fm, sol, fmt))


def fit_to_stored(B: torch.Tensor, sq_norms: torch.Tensor, b_grams: torch.Tensor, weights: torch.Tensor, a_index: list[int], b_index: list[int], fmt: NumberFormat, stored: StoredA) -> tuple[MergedModule, torch.Tensor]:
    """:func:`fit_stored` given the stored A's: it needs of the tasks only their ``B`` (T, d_out, r,
    as ``factor_space`` stacks them), ``sq_norms`` and ``b_grams`` (``FactoredModule.sq_norms``,
    ``.b_grams``), not the factored space, so a module whose A's were stored earlier is built without it."""
    w = weights.to(DTYPE)
    B_st: list[StoredFactor] = []
    errors = torch.zeros(B.shape[0], dtype=DTYPE)
    for chunk in _fitted_chunks(B, w, b_index, stored):
        factors, values = StoredFactor.encode_stack(chunk.fitted, fmt, transposed=True)
        B_st += factors
        _chunk_errors(errors, chunk, sq_norms, b_grams, w, stored, values)
    module = MergedModule(shape=(B.shape[1], stored.factors[0].shape[1]), a_index=list(a_index), b_index=list(b_index), A=stored.factors, B=B_st)
    return module, errors


def stored_errors(fm: FactoredModule, weights: torch.Tensor, sol: LayoutSolution, fmt: NumberFormat, stored: StoredA) -> torch.Tensor:
    """:func:`fit_stored`'s errors alone, for measuring a candidate: the same codes and values,
    without splitting them into the module's factors."""
    w = weights.to(DTYPE)
    errors = torch.zeros(fm.n_tasks, dtype=DTYPE)
    for chunk in _fitted_chunks(fm.B, w, sol.b_index, stored):
        values = StoredFactor.quantise_stack(chunk.fitted, fmt, transposed=True, codes=False)[1].transpose(1, 2)
        _chunk_errors(errors, chunk, fm.sq_norms, fm.b_grams, w, stored, values)
    return errors


def _runs(n: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    """``[lo, hi)`` runs of ``range(n)`` whose rows of ``row_bytes`` each fit :data:`CHUNK_BYTES`."""
    per = max(1, CHUNK_BYTES // max(row_bytes, 1))
    return ((lo, min(n, lo + per)) for lo in range(0, n, per))


@dataclass
class _Chunk:
    """A few B-groups' least-squares B's (:func:`_fitted_chunks`): ``tasks``, ``local[i]`` the group of
    ``tasks[i]`` within the chunk, ``B`` the tasks' own B's, ``fitted`` the groups' float32 B^'s and,
    with a B per task, ``coef`` their ``K_t`` (``fitted[i] = B[i] coef[i]``, :func:`_own_coef`)."""

    tasks: list[int]
    local: list[int]
    B: torch.Tensor
    fitted: torch.Tensor
    coef: torch.Tensor | None


def _fitted_chunks(B: torch.Tensor, w: torch.Tensor, b_index: list[int], a: StoredA) -> Iterator[_Chunk]:
    """The least-squares B's (float32, as :func:`_solve_B` gives them) for the stored A's, a few
    B-groups at a time. Each group's least squares involves only its own tasks, so the chunks give
    what one call on all groups gives, group by group."""
    k_b, (T, d_out, _) = max(b_index) + 1, B.shape
    own = b_index == list(range(T))  # a B per task (one group of one task in a chunk is not: it is solved as groups are)
    for g0, g1 in _runs(k_b, 4 * d_out * max(a.gram.shape[-1], 1)):
        tasks = [t for t in range(T) if g0 <= b_index[t] < g1]
        local = [b_index[t] - g0 for t in tasks]
        Bc, index = _take(B, tasks), [a.index[t] for t in tasks]
        if own:  # _solve_B's own branch, keeping K_t
            coef = _own_coef(a.cross[tasks], a.gram, index)
            yield _Chunk(tasks, local, Bc, (coef.transpose(1, 2) @ Bc.transpose(1, 2)).transpose(1, 2).float(), coef)
        else:
            yield _Chunk(tasks, local, Bc, _solve_B(Bc, w[tasks], a.cross[tasks], a.gram, index, local, g1 - g0).float(), None)


def _chunk_errors(out: torch.Tensor, chunk: _Chunk, sq_norms: torch.Tensor, b_grams: torch.Tensor, w: torch.Tensor, a: StoredA, values: torch.Tensor) -> None:
    """:func:`_errors` of a chunk's tasks into ``out``, a few tasks at a time (``values[local[i]]``:
    the stored B of ``tasks[i]``).

    With a B per task, the fit's normal equations ``F_t gram_t = B_t cross_t`` (``F_t = B_t K_t``, the
    float B^, ``gram_t`` the gram of the task's A-group) split the error of the stored ``F_t + E_t``
    into the fit's and the rounding's (the cross terms cancel):
    ``||B_t A_t - (F_t + E_t) A^||^2 = ||dW_t||^2 - tr(K_t^T (B_t^T B_t) cross_t) + tr(E_t^T E_t gram_t)``:
    r x r' products and the rounding's own Gram, with no product of the tasks' B's with B^
    (``b_grams``: the tasks' ``B_t^T B_t``)."""
    tasks, local = chunk.tasks, chunk.local
    for lo, hi in _runs(len(tasks), 4 * values.shape[1] * values.shape[2]):
        ts, ls, index = tasks[lo:hi], local[lo:hi], [a.index[t] for t in tasks[lo:hi]]
        if chunk.coef is None:
            out[ts] = _errors(chunk.B[lo:hi], sq_norms[ts], w[ts], a.cross[ts], a.gram, index, values[min(ls) : max(ls) + 1], [x - min(ls) for x in ls])
            continue
        K, E = chunk.coef[lo:hi], (values[lo:hi] - chunk.fitted[lo:hi]).transpose(1, 2).contiguous()  # one layout, whichever the values came in
        fit = ((b_grams[ts] @ K) * a.cross[ts]).sum((1, 2))
        rounding = ((E @ E.transpose(1, 2)) * a.gram[index]).sum((1, 2))
        out[ts] = w[ts] * (sq_norms[ts] - fit + rounding).clamp_min(0)


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x[rows]``: a view when the rows are consecutive (no copy), else a gather."""
    return x[rows[0] : rows[-1] + 1] if rows == list(range(rows[0], rows[-1] + 1)) else x[rows]


def stored_error(fm: FactoredModule, weights: torch.Tensor, module: MergedModule) -> torch.Tensor:
    """Per-task weighted squared errors of the factors ``module`` stores (ranks zero-padded alike)."""
    r = max(module.rank, *(f.shape[0] for f in module.A))
    A = torch.zeros(len(module.A), r, fm.shape[1], dtype=DTYPE)
    B = torch.zeros(len(module.B), fm.shape[0], r, dtype=DTYPE)
    for i, f in enumerate(module.A):
        A[i, : f.shape[0]] = f.values().to(DTYPE)
    for i, f in enumerate(module.B):
        B[i, :, : f.shape[1]] = f.values().to(DTYPE)
    cross, gram, index = _stored_products(fm, A, module.a_index)
    return _errors(fm.B, fm.sq_norms, weights.to(DTYPE), cross, gram, index, B, _groups_or_none(module.b_index))


def quantisation_noise(fm: FactoredModule, weights: torch.Tensor, fmt: NumberFormat, sol: LayoutSolution) -> float:
    """Relative error that storing ``sol`` in ``fmt`` adds (used to rank candidates; the planner
    measures the candidates it may pick exactly)."""
    err = stored_errors(fm, weights, sol, fmt, stored_A(fm, sol, fmt))
    total = float((weights.to(DTYPE) * fm.sq_norms).sum())
    fitted = max(total - sol.history[-1], 1e-30)
    return max(float(err.sum()) - sol.history[-1], 0.0) / fitted
