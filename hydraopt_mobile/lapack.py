"""Three BLAS/LAPACK routines the merge needs that torch lacks or scipy serialises, called through
ctypes, which releases the GIL during a foreign call.

``?syevr`` for a subset of eigenpairs: ``scipy.linalg.eigh(..., subset_by_index=..., driver="evr")``
is the fastest way to the top few eigenpairs of a dense symmetric matrix a few hundred wide (its
tridiagonal reduction dominates), but scipy's f2py wrapper holds the GIL for the whole LAPACK call,
so a merge running modules on two threads (parallel.py) spends those calls one thread at a time:
2 x 10 calls on a 640 x 640 Gram took 0.66 s on two threads against 0.65 s on one. This module
calls the same routine of the same library, the function scipy exports for Cython
(``scipy.linalg.cython_lapack``): the same 2 x 10 calls take 0.35 s on two threads. The arguments
are scipy's (``uplo='L'``, ``abstol=0``, the workspace LAPACK asks for), so the results are scipy's
bit for bit (tests/test_lapack.py).

``?trmm``, a product with a triangular matrix (half the flops of a general product; torch has
none): the stacked A's of a module in its factored space are triangular (factored.py), and the
shared-A Grams multiply by them twice.

``?syrk``, a Gram matrix ``X^T X`` (half the flops of the general product torch would run: one
triangle is computed and mirrored): a module's Gram of all tasks' B's (factored.b_gram, d_out x
T r by T r: 1600 x 1600 from 14336 rows at Llama-3-8B shapes with 100 tasks) and the similarity's
Grams of stacked bases (similarity.py). At that size it takes 0.38 s on one thread where torch's
product takes 0.70 s.
"""

from __future__ import annotations

import ctypes

import numpy as np
import scipy.linalg.cython_blas
import scipy.linalg.cython_lapack
import torch

_INT, _STR = ctypes.POINTER(ctypes.c_int), ctypes.c_char_p


def _signature(real: type) -> type:
    """``void ?syevr(jobz, range, uplo, n, a, lda, vl, vu, il, iu, abstol, m, w, z, ldz, isuppz,
    work, lwork, iwork, liwork, info)`` with ``real`` the C type of the floats."""
    R = ctypes.POINTER(real)
    return ctypes.CFUNCTYPE(None, _STR, _STR, _STR, _INT, R, _INT, R, R, _INT, _INT, R, _INT, R, R, _INT, _INT, R, _INT, _INT, _INT, _INT)


def _function_pointer(name: str, module: object = scipy.linalg.cython_lapack) -> int:
    capsule = module.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return get_pointer(capsule, get_name(capsule))


_SYEVR = {np.dtype(np.float64): (_signature(ctypes.c_double)(_function_pointer("dsyevr")), ctypes.c_double),
          np.dtype(np.float32): (_signature(ctypes.c_float)(_function_pointer("ssyevr")), ctypes.c_float)}


def eigh_top(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenvalues (ascending, as scipy returns them) and their eigenvectors
    (n, k) of the symmetric float32 or float64 matrix ``a`` (n, n); what ``scipy.linalg.eigh(a,
    subset_by_index=[n - k, n - 1], driver="evr")`` returns, without holding the GIL."""
    n = a.shape[0]
    if a.shape != (n, n) or not 1 <= k <= n:
        raise ValueError(f"eigh_top needs a square matrix and 1 <= k <= n; got shape {tuple(a.shape)} and k={k}")
    if a.dtype not in _SYEVR:
        raise TypeError(f"eigh_top needs float32 or float64, got {a.dtype}")
    syevr, real = _SYEVR[a.dtype]
    R = ctypes.POINTER(real)
    work_a = np.array(a, order="F")  # LAPACK overwrites it
    w = np.empty(n, dtype=a.dtype)
    z = np.empty((n, k), dtype=a.dtype, order="F")
    isuppz = np.empty(2 * n, dtype=np.intc)
    ints = {name: ctypes.c_int(v) for name, v in (("n", n), ("il", n - k + 1), ("iu", n), ("m", 0), ("info", 0))}
    vl, vu, abstol = real(0.0), real(1.0), real(0.0)

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        n_ref = ctypes.byref(ints["n"])
        syevr(b"V", b"I", b"L", n_ref, work_a.ctypes.data_as(R), n_ref, ctypes.byref(vl), ctypes.byref(vu),
                ctypes.byref(ints["il"]), ctypes.byref(ints["iu"]), ctypes.byref(abstol), ctypes.byref(ints["m"]),
                w.ctypes.data_as(R), z.ctypes.data_as(R), n_ref, isuppz.ctypes.data_as(_INT),
                work.ctypes.data_as(R), ctypes.byref(ctypes.c_int(lwork)), iwork.ctypes.data_as(_INT),
                ctypes.byref(ctypes.c_int(liwork)), ctypes.byref(ints["info"]))

    query, iquery = np.empty(1, dtype=a.dtype), np.empty(1, dtype=np.intc)
    call(query, -1, iquery, -1)  # the workspace sizes LAPACK asks for
    lwork, liwork = int(query[0]), int(iquery[0])
    call(np.empty(lwork, dtype=a.dtype), lwork, np.empty(liwork, dtype=np.intc), liwork)
    if ints["info"].value != 0 or ints["m"].value != k:
        raise np.linalg.LinAlgError(f"syevr failed (info={ints['info'].value}, {ints['m'].value} of {k} eigenvalues)")
    return w[:k], z


def _trmm_signature(real: type) -> type:
    """``void ?trmm(side, uplo, transa, diag, m, n, alpha, a, lda, b, ldb)``."""
    R = ctypes.POINTER(real)
    return ctypes.CFUNCTYPE(None, _STR, _STR, _STR, _STR, _INT, _INT, R, R, _INT, R, _INT)


_TRMM = {torch.float64: (_trmm_signature(ctypes.c_double)(_function_pointer("dtrmm", scipy.linalg.cython_blas)), ctypes.c_double),
         torch.float32: (_trmm_signature(ctypes.c_float)(_function_pointer("strmm", scipy.linalg.cython_blas)), ctypes.c_float)}


def lower_triangular_product(L: torch.Tensor, X: torch.Tensor, alpha: float = 1.0, transpose_L: bool = False, L_on_left: bool = True) -> torch.Tensor:
    """``alpha op(L) X`` (``L_on_left``) or ``alpha X op(L)``, ``op(L)`` being ``L`` or (``transpose_L``)
    ``L^T``, for a square lower-triangular ``L`` (n, n) whose entries above the diagonal are zero
    (they are not read) and a matrix ``X`` of matching shape: BLAS ``?trmm`` on a copy of ``X``.

    Row-major ``L`` is column-major ``L^T`` (upper triangular), and row-major results are
    column-major transposes: ``op(L) X`` is computed as ``X^T op(L)^T``, side and transposition
    swapped accordingly."""
    n = L.shape[0]
    if L.dim() != 2 or L.shape != (n, n) or X.dim() != 2 or (X.shape[0] if L_on_left else X.shape[1]) != n:
        raise ValueError(f"lower_triangular_product: L must be square and match X; got L {tuple(L.shape)}, X {tuple(X.shape)}")
    if L.dtype not in _TRMM or X.dtype != L.dtype:
        raise TypeError(f"lower_triangular_product needs float32 or float64 tensors of one dtype, got {L.dtype} and {X.dtype}")
    trmm, real = _TRMM[L.dtype]
    R = ctypes.POINTER(real)
    Lc = L.contiguous()
    out = X.clone(memory_format=torch.contiguous_format)  # BLAS overwrites it
    m, k = out.shape[1], out.shape[0]  # the column-major matrix B = out^T is m x k
    side = b"R" if L_on_left else b"L"  # (op(L) X)^T = X^T op(L)^T: L moves to the other side
    trans = b"T" if transpose_L else b"N"  # column-major L is L^T: op(L)^T is L^T (N) or, for op(L) = L^T, L (T)
    trmm(side, b"U", trans, b"N", ctypes.byref(ctypes.c_int(m)), ctypes.byref(ctypes.c_int(k)), ctypes.byref(real(alpha)),
         ctypes.cast(Lc.data_ptr(), R), ctypes.byref(ctypes.c_int(n)), ctypes.cast(out.data_ptr(), R), ctypes.byref(ctypes.c_int(m)))
    return out


def _syrk_signature(real: type) -> type:
    """``void ?syrk(uplo, trans, n, k, alpha, a, lda, beta, c, ldc)``."""
    R = ctypes.POINTER(real)
    return ctypes.CFUNCTYPE(None, _STR, _STR, _INT, _INT, R, R, _INT, R, R, _INT)


_SYRK = {torch.float64: (_syrk_signature(ctypes.c_double)(_function_pointer("dsyrk", scipy.linalg.cython_blas)), ctypes.c_double),
         torch.float32: (_syrk_signature(ctypes.c_float)(_function_pointer("ssyrk", scipy.linalg.cython_blas)), ctypes.c_float)}


def gram(x: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """``X^T X``, the Gram of the columns of ``x`` (m, n), or (``rows``) ``X X^T``, of its rows:
    BLAS ``?syrk`` for one triangle, mirrored, so the result is exactly symmetric.

    Row-major ``X`` is column-major ``X^T`` (n x m, leading dimension n): ``syrk`` with ``trans='N'``
    gives ``X^T X``, with ``trans='T'`` ``X X^T``; the column-major lower triangle it fills is the
    row-major upper one."""
    if x.dim() != 2:
        raise ValueError(f"gram needs a matrix, got shape {tuple(x.shape)}")
    if x.dtype not in _SYRK:
        raise TypeError(f"gram needs a float32 or float64 tensor, got {x.dtype}")
    syrk, real = _SYRK[x.dtype]
    R = ctypes.POINTER(real)
    xc = x.contiguous()
    m, n = xc.shape
    size, depth = (m, n) if rows else (n, m)
    out = torch.zeros(size, size, dtype=x.dtype)
    if size and depth:
        syrk(b"L", b"T" if rows else b"N", ctypes.byref(ctypes.c_int(size)), ctypes.byref(ctypes.c_int(depth)), ctypes.byref(real(1.0)),
             ctypes.cast(xc.data_ptr(), R), ctypes.byref(ctypes.c_int(n)), ctypes.byref(real(0.0)), ctypes.cast(out.data_ptr(), R), ctypes.byref(ctypes.c_int(size)))
    return out + out.triu(1).T
