"""The CPU kernel layer (docs/performance.md#blocked-kernels): ops whose chains run block by
block over rows give exactly the bits of the same chain on the whole array (the reference),
for sizes that split into several blocks, a ragged last block, and one block."""
import numpy as np
import pytest

from lowrank import backend
from lowrank.backend import blocked
from lowrank.ops import gelu

CHAINS = [  # (blocked op, reference chain, number of inputs)
    (lambda x: gelu.gelu_forward(x)[0], lambda x: gelu.tanh_chain(x)[0], 1),
    (lambda x: gelu.gelu_forward(x)[1][1], lambda x: gelu.tanh_chain(x)[1], 1),
    (lambda x: gelu.gelu_erf_forward(x)[0], lambda x: gelu.erf_chain(x)[0], 1),
    (lambda x: gelu.gelu_erf_forward(x)[1], lambda x: gelu.erf_chain(x)[1], 1),
    (lambda dy, x, p: gelu.gelu_backward(dy, (x, p)), gelu.tanh_backward_chain, 3),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rows", [1, 700, 1031])
@pytest.mark.parametrize("case", range(len(CHAINS)))
def test_blocked_chains_equal_the_whole_array_reference(case, rows, dtype):
    op, reference, n_inputs = CHAINS[case]
    rng = np.random.default_rng(case)
    arrays = [(3 * rng.standard_normal((rows, 300))).astype(dtype) for _ in range(n_inputs)]
    got, want = op(*arrays), reference(*arrays)
    assert got.dtype == np.dtype(dtype) and np.array_equal(got, want)


def test_large_arrays_really_are_split(monkeypatch):
    calls = []

    def chain(x, out=None):
        calls.append(x.shape[0])
        return gelu.tanh_chain(x, out)
    x = np.ones((1000, 256), dtype=np.float32)            # 1 KiB rows: 256 per block
    blocked.map_rows(chain, x, outputs=2)
    assert calls == [256, 256, 256, 232]
    calls.clear()
    blocked.map_rows(chain, x[:300], outputs=2)            # under two blocks: one call
    assert calls == [300]


def test_non_numpy_arrays_take_the_reference_path():
    host = np.linspace(-3, 3, 256000, dtype=np.float32).reshape(1000, 256)
    y, p = gelu.gelu_forward(backend.asarray(host, xp=backend.strict_numpy))
    assert backend.backend_of(y) == "numpy-strict"
    np.testing.assert_array_equal(backend.to_numpy(y), gelu.tanh_chain(host)[0])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 40), (1500, 300)])
def test_blocked_dropout_draws_the_bits_of_keep_mask(dtype, shape):
    """``DeviceRNG.dropout`` (the blocked chain) and ``keep_mask`` then a product: same bits."""
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    x_d, mask = backend.DeviceRNG(3, np).dropout(x, 0.1)
    want = backend.DeviceRNG(3, np).keep_mask(shape, 0.1, dtype)
    assert np.array_equal(mask, want) and np.array_equal(x_d, x * want)
    assert 0.05 < float((mask == 0).mean()) < 0.2 or x.size < 100



@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 40), (1500, 300)])
def test_compact_dropout_is_the_float_mask_in_one_byte(dtype, shape):
    """``compact_dropout``: the bits of ``dropout``, the mask as bool; applying it again (the
    backward's ``x ⊙ mask`` and ``dx ⊙ mask``, in place or not) gives the float product's bits,
    negative zeros included."""
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    x.reshape(-1)[:5] = [-0.0, 0.0, -1.5, np.inf, -np.inf]
    x_d, compact = backend.DeviceRNG(3, np).compact_dropout(x, 0.1)
    want_d, want_mask = backend.DeviceRNG(3, np).dropout(x, 0.1)
    assert compact.compact and compact.keep.dtype == np.bool_ and compact.keep.nbytes == x.size
    np.testing.assert_array_equal(compact.multiplier(dtype), want_mask)
    for got in (x_d, compact.apply(x), compact.apply(x.copy(), in_place=True)):
        assert got.dtype == np.dtype(dtype) and got.shape == x.shape
        assert np.array_equal(got, want_d, equal_nan=True)
        assert np.array_equal(np.signbit(got), np.signbit(want_d))


def test_a_dense_mask_is_applied_as_given():
    dense = np.array([[0.0, 2.0], [2.0, 0.0]], dtype=np.float32)
    mask = backend.DropoutMask(dense=dense)
    x = np.array([[1.0, -3.0], [5.0, 7.0]], dtype=np.float32)
    assert not mask.compact and np.array_equal(mask.apply(x), x * dense)
    y = x.copy()
    assert mask.apply(y, in_place=True) is y and np.array_equal(y, x * dense)
    with pytest.raises(ValueError, match="either keep bits or a dense"):
        backend.DropoutMask()

def _gemm_cases(rng, dtype):
    N, k, m = 37, 8, 29
    def arr(*shape):
        return rng.standard_normal(shape).astype(dtype)
    yield arr(N, k), arr(k, m)                               # both row-major
    yield arr(k, N).T, arr(m, k).T                           # both transposed views
    yield np.asfortranarray(arr(N, k)), arr(k, m)
    yield arr(N, 2 * k)[:, ::2], arr(k, m)                   # strided: the plain fallback
    yield arr(N, k + 3)[:, :k], arr(k + 1, m)[1:]            # leading-dimension views


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_add_matmul_accumulates_in_place(dtype):
    rng = np.random.default_rng(0)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for a, b in _gemm_cases(rng, dtype):
        c = rng.standard_normal((a.shape[0], b.shape[1])).astype(dtype)
        want = c.astype(np.float64) + 2.5 * (a.astype(np.float64) @ b.astype(np.float64))
        got = blocked.add_matmul(c, a, b, alpha=2.5)
        assert got is c and c.dtype == np.dtype(dtype)
        np.testing.assert_allclose(c, want, rtol=tol, atol=tol)


def test_add_matmul_reaches_blas_on_numpy(monkeypatch):
    """The gemm path runs where NumPy's BLAS exports cblas (the wheels do) and c has enough
    rows; a one-row product keeps NumPy's own (gemv) form. A planted failure of the symbol
    lookup would otherwise pass silently through the fallback."""
    gemm = blocked._cblas_gemm(np.float32)
    if gemm is None:
        pytest.skip("this NumPy's BLAS exports no cblas_sgemm: the plain form runs")
    calls = []
    monkeypatch.setitem(blocked._GEMMS, "f", lambda *args: (calls.append(args[3]), gemm(*args)))
    rows = blocked.GEMM_MIN_ROWS
    c = np.zeros((rows, 3), np.float32)
    a, b = np.ones((rows, 2), np.float32), np.ones((2, 3), np.float32)
    assert np.array_equal(blocked.add_matmul(c, a, b), np.full((rows, 3), 2.0, np.float32))
    assert calls == [rows]
    blocked.add_matmul(c[:1], a[:1], b)                        # one row: plain
    assert calls == [rows] and np.array_equal(c[0], np.full(3, 4.0, np.float32))
    assert blocked._gemm_layout(c, a, c[:2]) is None           # c may not be an operand


def test_float32_erf_gelu_is_within_pytorchs_error():
    """The float32 rational Φ (docs/performance.md#erf-gelu): erf within 8 ulps; the GELU
    within 1.5e-6 of float64 on [-6, 6] (PyTorch's float32 GELU: 1.2e-6 on this grid)."""
    from scipy.special import erf
    x = np.linspace(-6.0, 6.0, 400_000).astype(np.float32)
    y, slope = gelu.gelu_erf_forward(x.reshape(-1, 1000))
    phi = backend.normal_cdf(x)
    x64 = x.astype(np.float64)
    exact = 0.5 * (1.0 + erf(x64 / np.sqrt(2.0)))
    assert np.abs(y.ravel() - x64 * exact).max() < 1.5e-6
    exact_slope = exact + x64 * np.exp(-0.5 * x64 * x64) / np.sqrt(2.0 * np.pi)
    assert np.abs(slope.ravel() - exact_slope).max() < 1e-6
    assert np.abs(phi.ravel() - exact).max() < 2.6e-7                # |Δerf| / 2
    assert phi.min() >= 0.0 and phi.max() <= 1.0                    # a probability


def test_float64_erf_gelu_stays_exact():
    from scipy.special import erf
    x = np.linspace(-6.0, 6.0, 3000).reshape(3, 1000)
    y, _ = gelu.gelu_erf_forward(x)
    np.testing.assert_allclose(y, x * 0.5 * (1.0 + erf(x / np.sqrt(2.0))), rtol=0, atol=1e-15)
