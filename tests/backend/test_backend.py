"""The backend switch, and the strict stand-in that makes CuPy's refusals visible on a CPU."""
import numpy as np
import pytest

from lowrank import backend
from lowrank.backend import StrictMixingError, strict_numpy as sxp


def test_strict_arrays_compute_like_numpy():
    a_host = np.arange(6.0).reshape(2, 3)
    a = sxp.asarray(a_host)
    b = (a @ a.T + 1.0) * 2.0
    assert isinstance(b, backend.StrictArray)
    np.testing.assert_array_equal(backend.to_numpy(b), (a_host @ a_host.T + 1.0) * 2.0)
    assert float(a.sum()) == 15.0
    assert a.reshape(3, 2).shape == (3, 2) and a.T.shape == (3, 2)
    assert a[1, 2].item() == 5.0 and a[:, 1].tolist() == [1.0, 4.0]


@pytest.mark.parametrize("mix", [
    lambda a, h: a + h,
    lambda a, h: h + a,
    lambda a, h: a @ h.T,
    lambda a, h: np.add(a, h),
    lambda a, h: np.concatenate([a, h]),
    lambda a, h: a.__setitem__(0, h[0]),
    lambda a, h: a[np.array([0])],
])
def test_strict_refuses_mixing_with_host_arrays(mix):
    a, h = sxp.ones((2, 3)), np.ones((2, 3))
    with pytest.raises(StrictMixingError, match="numpy.ndarray"):
        mix(a, h)


def test_strict_refuses_implicit_host_conversion():
    a = sxp.ones((2, 2))
    with pytest.raises(StrictMixingError, match="implicit conversion"):
        np.asarray(a)
    with pytest.raises(StrictMixingError):
        np.linalg.norm(np.asarray(a))


def test_strict_reductions_are_0d_arrays_like_cupy():
    """NumPy returns float64 scalars; CuPy returns 0-d arrays. Strict must behave like CuPy."""
    total = sxp.ones(3, dtype=np.float32).sum()
    assert isinstance(total, backend.StrictArray) and total.ndim == 0
    assert (sxp.ones(3, dtype=np.float32) * 0.5).dtype == np.float32


def test_strict_linalg_and_scatter_add():
    w = sxp.asarray(np.random.default_rng(0).standard_normal((5, 3)))
    U, S, Vt = backend.svd(w)
    assert isinstance(U, backend.StrictArray) and U.shape == (5, 3)
    np.testing.assert_allclose(backend.to_numpy((U * S) @ Vt), backend.to_numpy(w), atol=1e-12)
    target = sxp.zeros((4, 2))
    backend.scatter_add(target, sxp.asarray(np.array([1, 1, 3])), sxp.ones((3, 2)))
    np.testing.assert_array_equal(backend.to_numpy(target)[:, 0], [0, 2, 0, 1])


def test_get_namespace_refuses_mixed_backends():
    with pytest.raises(ValueError, match="different backends"):
        backend.get_namespace(np.ones(2), sxp.ones(2))
    assert backend.get_namespace(np.ones(2), None) is np
    assert backend.get_namespace(sxp.ones(2)) is sxp


def test_backend_selection_by_argument_and_environment(monkeypatch):
    monkeypatch.setattr(backend, "_active", None)
    monkeypatch.setenv("LOWRANK_BACKEND", "numpy-strict")
    assert backend.get_backend() == "numpy-strict" and backend.xp_default() is sxp
    backend.set_backend("numpy")
    assert backend.xp_default() is np
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.set_backend("jax")


@pytest.mark.skipif(backend.cupy_available(), reason="cupy loads here")
def test_cupy_unavailable_says_what_to_install():
    with pytest.raises(RuntimeError, match=r"pip install -e \"\.\[gpu\]\""):
        backend.namespace("cupy")


def test_host_rng_gives_identical_starts_on_every_backend(xp):
    a = backend.host_normal(7, (3, 4), std=0.5, dtype="float32", xp=xp)
    b = backend.host_normal(7, (3, 4), std=0.5, dtype="float32", xp=np)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(backend.to_numpy(a), b)


def test_dtype_policy():
    assert backend.check_dtype(None) == "float32"
    assert backend.check_dtype(np.float64) == "float64"
    with pytest.raises(ValueError, match="dtype"):
        backend.check_dtype("float16")


def test_dropout_mask_is_inverted_and_on_the_backend(xp):
    rng = backend.DeviceRNG(0, xp)
    mask = rng.keep_mask((2000,), 0.25, np.float32)
    host = backend.to_numpy(mask)
    assert mask.dtype == np.float32 and backend.backend_of(mask) == backend.backend_of(xp.ones(1))
    assert set(np.unique(host)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((host == 0).mean() - 0.25) < 0.05
