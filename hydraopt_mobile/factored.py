"""Computing with LoRA updates without ever forming a dense d_out x d_in matrix per task.

Every task's update ``dW_t = B_t A_t`` has its rows in the span of the stacked A's. With ``Q``
an orthonormal basis of that span (one QR per module), ``dW_t = B_t a_t Q^T`` where
``a_t = A_t Q`` is small (r_t x q, q <= sum r_t). Norms and inner products of updates reduce to
traces of r x r products, and the right singular vectors of stacked updates (what a shared A
must span) come from one SVD of a (sum r_t) x q matrix. Cost is linear in d_in, d_out and T.
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
    sq_norms: torch.Tensor  # (T,) ||dW_t||_F^2

    @property
    def n_tasks(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[1], self.Q.shape[0])


def factor_space(factors: list[LoraFactors]) -> FactoredModule:
    """Build the factored representation of one module's task updates."""
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
    sq = (RA**2).sum(dim=(1, 2))
    return FactoredModule(Q=Q, a=a, B=B, RA=RA, sq_norms=sq)
