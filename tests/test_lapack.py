"""hydraopt_mobile.lapack: scipy's syevr called without the GIL gives scipy's results bit for bit;
the triangular product and the Gram (syrk) equal torch's general products."""

import threading

import numpy as np
import pytest
import scipy.linalg
import torch

from hydraopt_mobile.lapack import eigh_top, gram, lower_triangular_product


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,k", [(640, 32), (200, 7), (129, 1), (5, 5)])
def test_eigh_top_is_scipys_evr_bit_for_bit(dtype, n, k):
    rng = np.random.default_rng(n + k)
    x = rng.standard_normal((n, n + 3)).astype(dtype)
    gram = x @ x.T
    lam, V = scipy.linalg.eigh(gram, subset_by_index=[n - k, n - 1], driver="evr", check_finite=False)
    lam2, V2 = eigh_top(gram, k)
    assert lam2.dtype == dtype and V2.shape == (n, k)
    assert np.array_equal(lam, lam2) and np.array_equal(V, V2)
    np.testing.assert_allclose(gram @ V2, V2 * lam2, atol=1e-3 * float(lam2.max()))


def test_eigh_top_leaves_its_input_alone_and_runs_in_threads():
    gram = np.diag(np.arange(1.0, 301.0))
    before = gram.copy()
    results = [None, None]

    def run(i: int) -> None:
        results[i] = eigh_top(gram, 3)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(gram, before)
    for lam, V in results:
        assert np.array_equal(lam, [298.0, 299.0, 300.0])
        assert np.allclose(np.abs(V[297:]), np.eye(3))


@pytest.mark.parametrize("shape,k,dtype,match", [((3, 4), 1, np.float64, "square"), ((4, 4), 5, np.float64, "k=5"), ((4, 4), 0, np.float64, "k=0"), ((4, 4), 1, np.int64, "float32 or float64")])
def test_eigh_top_rejects_bad_input_by_name(shape, k, dtype, match):
    with pytest.raises((ValueError, TypeError), match=match):
        eigh_top(np.zeros(shape, dtype=dtype), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("transpose", [False, True])
def test_lower_triangular_product_equals_the_general_one(dtype, left, transpose):
    g = torch.Generator().manual_seed(7)
    L = torch.randn(37, 37, generator=g, dtype=dtype).tril()
    above = torch.randn(37, 37, generator=g, dtype=dtype).triu(1)  # never read
    X = torch.randn(37, 11, generator=g, dtype=dtype) if left else torch.randn(11, 37, generator=g, dtype=dtype)
    opL = L.T if transpose else L
    expected = 0.25 * (opL @ X if left else X @ opL)
    before = X.clone()
    got = lower_triangular_product(L + above, X, alpha=0.25, transpose_L=transpose, L_on_left=left)
    assert got.dtype == dtype and got.shape == expected.shape and torch.equal(X, before)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_lower_triangular_product_rejects_bad_input_by_name():
    with pytest.raises(ValueError, match="must be square"):
        lower_triangular_product(torch.zeros(3, 4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="match X"):
        lower_triangular_product(torch.zeros(3, 3), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="float32 or float64"):
        lower_triangular_product(torch.zeros(3, 3), torch.zeros(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(300, 40), (40, 300), (1, 7), (7, 1)])
def test_gram_equals_torchs_product_and_is_exactly_symmetric(dtype, shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for rows, expected in ((False, x.T @ x), (True, x @ x.T)):
        g = gram(x, rows=rows)
        assert g.dtype == dtype and g.shape == expected.shape
        assert torch.equal(g, g.T)
        assert float((g - expected).abs().max()) <= tol * float(expected.abs().max())
    assert torch.allclose(gram(x.T), x @ x.T, rtol=tol, atol=tol * float((x @ x.T).abs().max()))  # a transposed view is copied, not misread


def test_gram_of_an_empty_matrix_is_zero_and_bad_input_is_named():
    assert torch.equal(gram(torch.zeros(0, 3)), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="matrix"):
        gram(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="float32 or float64"):
        gram(torch.zeros(3, 3, dtype=torch.int64))
