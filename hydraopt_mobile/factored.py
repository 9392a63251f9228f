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

from dataclasses import dataclass

import torch

from hydraopt_mobile.adapters import LoraFactors

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
    d_out, d_in = factors[0].shape
    r = max(max(f.rank for f in factors), 1)
    A = torch.zeros(len(factors), r, d_in, dtype=DTYPE)
    B = torch.zeros(len(factors), d_out, r, dtype=DTYPE)
    for t, f in enumerate(factors):
        A[t, : f.rank] = f.A.to(DTYPE)
        B[t, :, : f.rank] = f.B.to(DTYPE)
    return A, B


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
    reflectors: torch.Tensor  # (d_in, T r) geqrf of the stacked A's transposed: Q's Householder vectors
    tau: torch.Tensor  # (q,) their scales
    a: torch.Tensor  # (T, r, q)  A_t Q
    R: torch.Tensor  # (T, r, r)  B_t = U_t R_t (QR)
    RA: torch.Tensor  # (T, r, q)  R_t a_t with B_t = U_t R_t, so N_t^T N_t = (R_t a_t)^T (R_t a_t)
    sq_norms: torch.Tensor  # (T,) ||dW_t||_F^2

    @property
    def n_tasks(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[1], self.A.shape[2])

    @property
    def q(self) -> int:
        return self.a.shape[2]

    def to_input_space(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords @ Q^T``: (..., q) coordinates back to (..., d_in), applying the reflectors
        (4 d_in q flops per row) instead of forming ``Q``."""
        lead, d_in = coords.shape[:-1], self.A.shape[2]
        rows = coords.reshape(-1, self.q)
        padded = torch.zeros(d_in, rows.shape[0], dtype=DTYPE)
        padded[: self.q] = rows.T
        return torch.ormqr(self.reflectors, self.tau, padded, left=True, transpose=False).T.reshape(*lead, d_in)


def factor_space(factors: list[LoraFactors]) -> FactoredModule:
    """Build the factored representation of one module's task updates (one QR of the stacked A's)."""
    A, B = _stacked(factors)
    T, r, d_in = A.shape
    reflectors, tau = torch.geqrf(A.reshape(-1, d_in).T)  # A_stack^T = Q R, R: (q, T r)
    q = tau.shape[0]
    a = reflectors[:q].triu().T.reshape(T, r, q)  # A_stack Q = R^T
    R = torch.linalg.qr(B, mode="r")[1]  # (T, r, r), batched
    RA = R @ a
    sq = (RA**2).sum(dim=(1, 2))
    return FactoredModule(A=A, B=B, reflectors=reflectors, tau=tau, a=a, R=R, RA=RA, sq_norms=sq)
