"""docs/decompose.md#svd-split: W = U diag(S) Vt + residual, exact and randomized, as Hypothesis properties."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from lowrank.nn.decompose import svd_split

from tests.helpers.common import to_host

# rounding tolerance of a reconstruction, relative to ‖W‖ and the size of the matrix
EPS = {"float32": 2e-6, "float64": 1e-14}
KINDS = ("gaussian", "rank_deficient", "zero", "decaying")


@st.composite
def matrices(draw):
    """(host float64 matrix, dtype, r): assorted shapes, ranks 1..min(m, n), and spectra."""
    m, n = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    kind = draw(st.sampled_from(KINDS))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if kind == "zero":
        W = np.zeros((m, n))
    elif kind == "rank_deficient":
        k = draw(st.integers(1, min(m, n)))
        W = rng.standard_normal((m, k)) @ rng.standard_normal((k, n))
    elif kind == "decaying":
        Q1, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
        Q2, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
        W = (Q1 * 0.5 ** np.arange(min(m, n))) @ Q2.T
    else:
        W = rng.standard_normal((m, n)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    r = draw(st.integers(1, min(m, n)))
    return W.astype(dtype).astype(np.float64), dtype, r


def check_split(split, W_host, dtype, r, optimal):
    m, n = W_host.shape
    U, S, Vt, res = map(to_host, (split.U, split.S, split.Vt, split.residual))
    assert U.shape == (m, r) and S.shape == (r,) and Vt.shape == (r, n) and res.shape == (m, n)
    assert split.residual.dtype == np.dtype(dtype)
    scale = max(np.linalg.norm(W_host), 1e-300)
    tol = EPS[dtype] * (m + n)
    # the core property: exact reconstruction
    assert np.linalg.norm((U * S) @ Vt + res - W_host) <= tol * scale
    # orthonormal factors, singular values descending and non-negative
    assert np.abs(U.T @ U - np.eye(r)).max() <= 10 * tol
    assert np.abs(Vt @ Vt.T - np.eye(r)).max() <= 10 * tol
    assert np.all(S >= 0) and np.all(np.diff(S) <= tol * max(S[0], 1e-300))
    sigma = np.linalg.svd(W_host, compute_uv=False)
    best = np.sqrt(np.sum(sigma[r:] ** 2))
    if optimal:   # Eckart–Young: the residual is the optimal one, and W - residual has rank <= r
        assert abs(np.linalg.norm(res) - best) <= tol * scale
        low_rank_sigma = np.linalg.svd(W_host - res, compute_uv=False)
        assert np.all(low_rank_sigma[r:] <= tol * scale)
        np.testing.assert_allclose(S, sigma[:r], atol=tol * scale)
    return np.linalg.norm(res), best, scale


@given(matrices())
def test_exact_split_properties(xp, case):
    W_host, dtype, r = case
    split = svd_split(xp.asarray(W_host, dtype=dtype), r, method="exact")
    check_split(split, W_host, dtype, r, optimal=True)


@given(matrices(), st.integers(0, 3), st.integers(0, 2**16))
def test_randomized_split_properties(xp, case, n_iter, seed):
    W_host, dtype, r = case
    split = svd_split(xp.asarray(W_host, dtype=dtype), r, method="randomized",
                      oversample=4, n_iter=n_iter, seed=seed)
    err, best, scale = check_split(split, W_host, dtype, r, optimal=False)
    # within a small factor of the optimum (HMT 2011: exact when r + p >= rank)
    assert err <= 2.0 * best + EPS[dtype] * (W_host.shape[0] + W_host.shape[1]) * scale


def test_randomized_split_is_near_optimal_on_a_decaying_spectrum(xp):
    rng = np.random.default_rng(3)
    Q1, _ = np.linalg.qr(rng.standard_normal((200, 120)))
    Q2, _ = np.linalg.qr(rng.standard_normal((120, 120)))
    W = (Q1 * np.arange(1, 121) ** -1.0) @ Q2.T
    split = svd_split(xp.asarray(W), 10, method="randomized", n_iter=4, seed=0)
    best = np.sqrt(np.sum(np.linalg.svd(W, compute_uv=False)[10:] ** 2))
    assert np.linalg.norm(to_host(split.residual)) <= 1.05 * best


def test_full_rank_leaves_no_residual(xp):
    W = np.random.default_rng(0).standard_normal((7, 4))
    for method in ("exact", "randomized"):
        split = svd_split(xp.asarray(W), 4, method=method)
        assert np.abs(to_host(split.residual)).max() < 1e-12


def test_seed_makes_randomized_split_deterministic(xp):
    W = xp.asarray(np.random.default_rng(1).standard_normal((30, 20)))
    a = svd_split(W, 3, method="randomized", oversample=2, n_iter=0, seed=5)
    b = svd_split(W, 3, method="randomized", oversample=2, n_iter=0, seed=5)
    np.testing.assert_array_equal(to_host(a.residual), to_host(b.residual))


def test_smallest_triplets_for_milora(xp):
    W = np.random.default_rng(2).standard_normal((6, 5))
    split = svd_split(xp.asarray(W), 2, smallest=True)
    sigma = np.linalg.svd(W, compute_uv=False)
    np.testing.assert_allclose(to_host(split.S), sigma[-2:], rtol=1e-12)
    assert abs(np.linalg.norm(to_host(split.residual)) - np.linalg.norm(sigma[:-2])) < 1e-12


@pytest.mark.parametrize("r", [0, -1, 5, 2.0, True])
def test_rank_outside_range_raises_with_the_range(xp, r):
    with pytest.raises(ValueError, match=r"r must be an integer in 1\.\.min\(m, n\) = 1\.\.4"):
        svd_split(xp.zeros((4, 6)), r)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_matrix_raises(xp, bad):
    W = np.ones((3, 3))
    W[1, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        svd_split(xp.asarray(W), 1)


def test_bad_method_and_shape_raise(xp):
    with pytest.raises(ValueError, match="method"):
        svd_split(xp.ones((3, 3)), 1, method="lanczos")
    with pytest.raises(ValueError, match="2-D"):
        svd_split(xp.ones(3), 1)
