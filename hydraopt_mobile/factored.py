"""Computing with LoRA updates without ever forming a dense d_out x d_in matrix per task.

Every task's update ``dW_t = B_t A_t`` has its rows in the span of the stacked A's. One Householder
QR per module, ``[A_1; ...; A_T]^T = Q R`` (``Q``: d_in x q, q <= sum r_t), gives everything:

- coordinates: ``a_t = A_t Q``; since ``[A_1; ...; A_T] = R^T Q^T``, the stacked ``a_t`` are just
  the rows of ``R^T``, so ``Q`` is never formed: it stays as its Householder reflectors and is
  applied to the few r' x q solutions that need mapping back to d_in (:meth:`FactoredModule.to_input_space`);
- ``dW_t = B_t a_t Q^T``: norms and inner products of updates reduce to traces of r x r products,
  and the right singular vectors of stacked updates (what a shared A must span) come from one
  eigendecomposition of a matrix of side at most q. Cost is linear in d_in, d_out and T.

The factored Gram of the stacked updates equals the dense one: for ``D = [dW_1; ...; dW_T]``,
``D^T D = sum_t A_t^T (B_t^T B_t) A_t = Q (sum_t a_t^T (B_t^T B_t) a_t) Q^T``, an r x r product per
task, so its non-zero eigenvalues are those of the q x q matrix in the middle and its eigenvectors
are ``Q`` times that matrix's (tests: ``test_factored_gram_equals_stacked``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from hydraopt_mobile.adapters import LoraFactors
from hydraopt_mobile.lapack import gram

if TYPE_CHECKING:
    from hydraopt_mobile.calibration import ModuleMoments

DTYPE = torch.float32  # fp32 halves the time; errors below ~1e-6 of ||dW||^2 are noise and do not matter for planning


def sq_norm(f: LoraFactors) -> float:
    """||B A||_F^2 = tr((B^T B)(A A^T))."""
    return float(((f.B.T @ f.B) * (f.A @ f.A.T)).sum())


def inner(f: LoraFactors, g: LoraFactors) -> float:
    """<B1 A1, B2 A2>_F = tr((B1^T B2)(A2 A1^T))."""
    return float(((f.B.T @ g.B) * (f.A @ g.A.T)).sum())


def factored_sq_error(target: LoraFactors, approx: LoraFactors) -> float:
    """||B A - B' A'||_F^2 from factors only (clamped at 0 against rounding)."""
    return max(sq_norm(target) - 2 * inner(target, approx) + sq_norm(approx), 0.0)


def _stacked(factors: list[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, r, d_in) A's and (T, d_out, r) B's, ranks zero-padded to the largest."""
    d_in = factors[0].shape[1]
    A = torch.zeros(len(factors), _padded_rank(factors), d_in, dtype=DTYPE)
    for t, f in enumerate(factors):
        A[t, : f.rank] = f.A.to(DTYPE)
    return A, stacked_B(factors)


def b_gram(B: torch.Tensor) -> torch.Tensor:
    """(T, r, T, r) ``B_s^T B_t`` for every pair of tasks (``B``: (T, d_out, r)), from one
    (T r) x (T r) Gram of the stacked B's (``syrk``, lapack.gram)."""
    T, d_out, r = B.shape
    return gram(B.permute(1, 0, 2).reshape(d_out, T * r)).reshape(T, r, T, r)


def stacked_B(factors: list[LoraFactors]) -> torch.Tensor:
    """(T, d_out, r) B's, ranks zero-padded to the largest: ``factor_space(factors).B``."""
    B = torch.zeros(len(factors), factors[0].shape[0], _padded_rank(factors), dtype=DTYPE)
    for t, f in enumerate(factors):
        B[t, :, : f.rank] = f.B.to(DTYPE)
    return B


def _padded_rank(factors: list[LoraFactors]) -> int:
    return max(max(f.rank for f in factors), 1)


def sq_errors(targets: list[LoraFactors], approx: list[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task ``||B A - B' A'||_F^2`` (clamped at 0) and ``||B A||_F^2`` (float64, (T,)), batched:
    the traces of :func:`factored_sq_error` for every task at once."""
    A, B = _stacked(targets)
    A2, B2 = _stacked(approx)

    def tr(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
        return ((B1.transpose(1, 2) @ B2) * (A1 @ A2.transpose(1, 2))).sum((1, 2)).double()

    norms = tr(B, A, B, A)
    return (norms - 2 * tr(B, A, B2, A2) + tr(B2, A2, B2, A2)).clamp_min(0), norms


@dataclass
class FactoredModule:
    """One module's tasks in the orthonormal row basis ``Q`` of their stacked A's.

    Ranks are zero-padded to a common ``r`` (zero rows of A and columns of B change nothing), so
    per-task quantities stack into batched tensors.
    """

    A: torch.Tensor  # (T, r, d_in) the tasks' A's
    B: torch.Tensor  # (T, d_out, r)
    reflectors: torch.Tensor  # (d_in, q) geqrf of the stacked A's transposed: Q's Householder vectors
    tau: torch.Tensor  # (q,) their scales
    a: torch.Tensor  # (T, r, q)  A_t Q
    R: torch.Tensor  # (T, r, r)  B_t = U_t R_t (QR)
    RA: torch.Tensor  # (T, r, q)  R_t a_t with B_t = U_t R_t, so N_t^T N_t = (R_t a_t)^T (R_t a_t)
    sq_norms: torch.Tensor  # (T,) ||dW_t||_F^2, or with calibration ||dW_t X_t^T||^2 / n_t
    S: torch.Tensor | None = None  # (T, q, q) calibration: Q^T S_t Q (calibration.py); None: the data-free objective
    outside: torch.Tensor | None = None  # (T,) calibration: S_t's mean eigenvalue outside span(Q)
    L: torch.Tensor | None = None  # whitened(): the Cholesky factor of the mean moment the coordinates are whitened by

    @property
    def n_tasks(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[1], self.A.shape[2])

    @cached_property
    def b_grams(self) -> torch.Tensor:
        """(T, r, r) ``B_t^T B_t = R_t^T R_t``, once per module (every candidate's measurement reads it)."""
        return self.R.transpose(1, 2) @ self.R

    @property
    def q(self) -> int:
        return self.a.shape[2]

    @property
    def square_a(self) -> bool:
        """Whether the stacked ``a`` (T r, q) is square, hence lower triangular: :func:`factor_space`
        makes it ``R^T`` (the QR's R of the stacked A's, q = T r when they have full rank) and
        :func:`whitened` ``R^T L`` (``L`` a Cholesky factor): products of lower-triangular matrices."""
        return self.a.shape[0] * self.a.shape[1] == self.q

    def to_input_space(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords @ Q^T``: (..., q) coordinates back to (..., d_in), applying the reflectors
        (4 d_in q flops per row) instead of forming ``Q``."""
        lead, d_in = coords.shape[:-1], self.A.shape[2]
        rows = coords.reshape(-1, self.q)
        padded = torch.zeros(d_in, rows.shape[0], dtype=DTYPE)
        padded[: self.q] = rows.T
        return torch.ormqr(self.reflectors, self.tau, padded, left=True, transpose=False).T.reshape(*lead, d_in)

    def to_coords(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ Q``: (..., d_in) rows to their (..., q) coordinates in span(Q), applying the
        reflectors (the first q rows of ``Q_full^T rows^T``)."""
        lead, d_in = rows.shape[:-1], self.A.shape[2]
        flat = rows.reshape(-1, d_in).to(DTYPE).T.contiguous()
        return torch.ormqr(self.reflectors, self.tau, flat, left=True, transpose=True)[: self.q].T.reshape(*lead, self.q)

    def basis(self) -> torch.Tensor:
        """``Q`` itself (d_in, q), formed from the reflectors: for what needs it explicitly
        (projecting calibration inputs, dense references in tests); the solver never does."""
        return torch.linalg.householder_product(self.reflectors, self.tau)


def factor_space(factors: list[LoraFactors], moments: "ModuleMoments | None" = None) -> FactoredModule:
    """Build the factored representation of one module's task updates (one QR of the stacked A's;
    with ``moments``, for the data-aware objective: ``moments.S`` must be in this Q's coordinates,
    as calibration.py makes it)."""
    A, B = _stacked(factors)
    T, r, d_in = A.shape
    reflectors, tau = torch.geqrf(A.reshape(-1, d_in).T)  # A_stack^T = Q R, R: (q, T r)
    q = tau.shape[0]
    a = reflectors[:q].triu().T.reshape(T, r, q)  # A_stack Q = R^T
    R = torch.linalg.qr(B, mode="r")[1]  # (T, r, r), batched
    RA = R @ a
    fm = FactoredModule(A=A, B=B, reflectors=reflectors[:, :q], tau=tau, a=a, R=R, RA=RA, sq_norms=(RA**2).sum(dim=(1, 2)))
    if moments is None:
        return fm
    if moments.S.shape[1] != q:
        raise ValueError(f"calibration moments are {moments.S.shape[1]}-dimensional, this module's factored space {q}")
    sq = ((RA @ moments.S) * RA).sum(dim=(1, 2))  # tr(R a S a^T R^T) = ||dW_t X_t^T||^2 / n_t
    return replace(fm, sq_norms=sq, S=moments.S, outside=moments.outside)


def whitened(fm: FactoredModule, weights: torch.Tensor) -> FactoredModule:
    """The data-free problem in coordinates whitened by the weighted mean moment ``S = L L^T``
    (``a -> a L``, so the tasks' A's become ``a_t L Q^T``, same Q): exact when every task has the
    same moments, a start and an estimate otherwise. Map a solution back with :func:`unwhiten`."""
    assert fm.S is not None
    w = weights.to(DTYPE).view(-1, 1, 1)
    mean = (w * fm.S).sum(0) / w.sum()
    L = ridged_cholesky(mean)
    a, RA = fm.a @ L, fm.RA @ L
    return FactoredModule(A=fm.to_input_space(a), B=fm.B, reflectors=fm.reflectors, tau=fm.tau, a=a, R=fm.R, RA=RA, sq_norms=(RA**2).sum(dim=(1, 2)), L=L)


def unwhiten(white: FactoredModule, a: torch.Tensor) -> torch.Tensor:
    """A's in the original Q coordinates from A's in :func:`whitened` coordinates (``a L^-1``)."""
    assert white.L is not None
    return torch.linalg.solve_triangular(white.L, a, upper=False, left=False)


def ridged_cholesky(S: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of S, with a ridge of 1e-6 of its mean eigenvalue if it is singular."""
    ridge = 1e-6 * float(torch.diagonal(S).mean().clamp_min(1e-30))
    L, info = torch.linalg.cholesky_ex(S + ridge * torch.eye(S.shape[0], dtype=S.dtype))
    if int(info):
        raise ValueError("calibration moment is not positive semi-definite")
    return L
