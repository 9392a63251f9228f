"""Computing with LoRA updates without ever forming a dense d_out x d_in matrix per task.

Every task's update ``dW_t = B_t A_t`` has its rows in the span of the stacked A's. With ``Q``
an orthonormal basis of that span (one QR per module), ``dW_t = B_t a_t Q^T`` where
``a_t = A_t Q`` is small (r_t x q, q <= sum r_t). Norms and inner products of updates reduce to
traces of r x r products, and the right singular vectors of stacked updates (what a shared A
must span) come from one SVD of a (sum r_t) x q matrix. Cost is linear in d_in, d_out and T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hydraopt_mobile.adapters import LoraFactors

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


@dataclass
class FactoredModule:
    """One module's tasks in the orthonormal row basis ``Q`` of their stacked A's.

    Ranks are zero-padded to a common ``r`` (zero rows of A and columns of B change nothing), so
    per-task quantities stack into batched tensors.
    """

    Q: torch.Tensor  # (d_in, q), orthonormal columns
    a: torch.Tensor  # (T, r, q)  A_t Q
    B: torch.Tensor  # (T, d_out, r)
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
        return (self.B.shape[1], self.Q.shape[0])


def factor_space(factors: list[LoraFactors], moments: "ModuleMoments | None" = None) -> FactoredModule:
    """Build the factored representation of one module's task updates (with ``moments``, for the
    data-aware objective: ``moments.S`` must be in this Q's coordinates, as calibration.py makes it)."""
    d_out, d_in = factors[0].shape
    r = max(max(f.rank for f in factors), 1)
    A = torch.zeros(len(factors), r, d_in, dtype=DTYPE)
    B = torch.zeros(len(factors), d_out, r, dtype=DTYPE)
    for t, f in enumerate(factors):
        A[t, : f.rank] = f.A.to(DTYPE)
        B[t, :, : f.rank] = f.B.to(DTYPE)
    stacked = A.reshape(-1, d_in)
    Q, _ = torch.linalg.qr(stacked.T, mode="reduced")  # (d_in, min(d_in, T r))
    a = A @ Q
    R = torch.linalg.qr(B, mode="r")[1]  # (T, r, r), batched
    RA = R @ a
    if moments is None:
        return FactoredModule(Q=Q, a=a, B=B, RA=RA, sq_norms=(RA**2).sum(dim=(1, 2)))
    if moments.S.shape[1] != Q.shape[1]:
        raise ValueError(f"calibration moments are {moments.S.shape[1]}-dimensional, this module's factored space {Q.shape[1]}")
    sq = ((RA @ moments.S) * RA).sum(dim=(1, 2))  # tr(R a S a^T R^T) = ||dW_t X_t^T||^2 / n_t
    return FactoredModule(Q=Q, a=a, B=B, RA=RA, sq_norms=sq, S=moments.S, outside=moments.outside)


def whitened(fm: FactoredModule, weights: torch.Tensor) -> FactoredModule:
    """The data-free problem in coordinates whitened by the weighted mean moment ``S = L L^T``
    (``a -> a L``): exact when every task has the same moments, a start and an estimate otherwise.
    Map a solution back with :func:`unwhiten`."""
    assert fm.S is not None
    w = weights.to(DTYPE).view(-1, 1, 1)
    mean = (w * fm.S).sum(0) / w.sum()
    L = _cholesky(mean)
    RA = fm.RA @ L
    return FactoredModule(Q=fm.Q, a=fm.a @ L, B=fm.B, RA=RA, sq_norms=(RA**2).sum(dim=(1, 2)), L=L)


def unwhiten(white: FactoredModule, a: torch.Tensor) -> torch.Tensor:
    """A's in the original Q coordinates from A's in :func:`whitened` coordinates (``a L^-1``)."""
    assert white.L is not None
    return torch.linalg.solve_triangular(white.L, a, upper=False, left=False)


def _cholesky(S: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of S, with a ridge of 1e-6 of its mean eigenvalue if it is singular."""
    ridge = 1e-6 * float(torch.diagonal(S).mean().clamp_min(1e-30))
    L, info = torch.linalg.cholesky_ex(S + ridge * torch.eye(S.shape[0], dtype=S.dtype))
    if int(info):
        raise ValueError("calibration moment is not positive semi-definite")
    return L
