"""Each functional op of the GPT: backward vs central finite differences (float64, rel < 1e-6),
forward vs a plain NumPy reference, and the edge cases (repeated ids, causality, bad targets).

The scalar probed is ``L = Σ out ⊙ R`` for a fixed random R, so ``dout = R``.
"""
import math

import numpy as np
import pytest

from lowrank import backend
from lowrank.ops import (attention_backward, attention_forward, cross_entropy_backward,
                         cross_entropy_forward, embedding_backward, embedding_forward,
                         gelu_backward, gelu_forward, layernorm_backward, layernorm_forward)

from tests.helpers.common import rel_err, to_host

FD_TOL = 1e-6
FD_EPS = 1e-5


def fd_grad(f, x, eps=FD_EPS):
    """Central differences of the host scalar function ``f`` at host array ``x`` (float64)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f(x)
        x[i] = old - eps
        down = f(x)
        x[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


def on(xp, a):
    return backend.asarray(a, xp=xp)


def probe(xp, forward, R):
    """``f(host array) = Σ forward(on_device(array)) ⊙ R`` for fd_grad."""
    return lambda h: float(np.sum(to_host(forward(on(xp, h))) * R))


def test_embedding_backward_matches_fd_with_repeated_ids(xp, rng):
    W = rng.standard_normal((6, 4))
    idx = np.array([[0, 2, 2], [5, 0, 2]])                     # repeats must accumulate
    R = rng.standard_normal((2, 3, 4))
    out, cache = embedding_forward(on(xp, W), on(xp, idx))
    np.testing.assert_array_equal(to_host(out), W[idx])
    dW = embedding_backward(on(xp, R), cache, 6)
    fd = fd_grad(lambda h: float(np.sum(h[idx] * R)), W.copy())
    err = rel_err(dW, fd)
    assert err < FD_TOL, err
    assert float(np.abs(to_host(dW)[[1, 3, 4]]).max()) == 0.0  # unused rows get nothing


def layernorm_reference(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def test_layernorm_forward_and_fd(xp, rng):
    x = rng.standard_normal((2, 3, 5)) * 2.0 + 0.5
    w = rng.standard_normal(5)
    b = rng.standard_normal(5)
    R = rng.standard_normal((2, 3, 5))
    y, cache = layernorm_forward(on(xp, x), on(xp, w), on(xp, b))
    assert rel_err(y, layernorm_reference(x, w, b)) < 1e-14
    dx, dw, db = layernorm_backward(on(xp, R), cache)
    for got, arg in ((dx, 0), (dw, 1), (db, 2)):
        args = [x, w, b]

        def f(h, arg=arg, args=args):
            a = list(args)
            a[arg] = h
            return float(np.sum(to_host(layernorm_forward(*(on(xp, v) for v in a))[0]) * R))
        err = rel_err(got, fd_grad(f, args[arg].copy()))
        assert err < FD_TOL, (arg, err)


def test_layernorm_skips_unrequested_grads(xp, rng):
    x, w, b = (on(xp, rng.standard_normal(s)) for s in ((4, 3), (3,), (3,)))
    _, cache = layernorm_forward(x, w, b)
    dx, dw, db = layernorm_backward(on(xp, rng.standard_normal((4, 3))), cache,
                                    need_dweight=False, need_dbias=False)
    assert dw is None and db is None and dx.shape == (4, 3)


def test_gelu_forward_and_fd(xp, rng):
    x = rng.standard_normal((3, 7)) * 2.0
    R = rng.standard_normal((3, 7))
    x_dev = on(xp, x)
    y, cache = gelu_forward(x_dev)
    ref = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert rel_err(y, ref) < 1e-14
    assert rel_err(x_dev, x) == 0.0                             # input untouched
    dx = gelu_backward(on(xp, R), cache)
    err = rel_err(dx, fd_grad(probe(xp, lambda a: gelu_forward(a)[0], R), x.copy()))
    assert err < FD_TOL, err


def attention_reference(q, k, v, H):
    B, T, d = q.shape
    hs = d // H
    y = np.zeros_like(q)
    for h in range(H):
        s = slice(h * hs, (h + 1) * hs)
        att = q[:, :, s] @ k[:, :, s].transpose(0, 2, 1) / math.sqrt(hs)   # (B, T, T)
        att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y[:, :, s] = att @ v[:, :, s]
    return y


@pytest.mark.parametrize("H,chunk", [(1, None), (2, None), (2, 3), (1, 1)])
def test_attention_forward_and_fd(xp, rng, H, chunk):
    """Whole (chunk None) and in causal chunks of queries: T = 4 in chunks of 3 (uneven)
    and of 1 (each query alone)."""
    B, T, d = 2, 4, 6
    q, k, v = (rng.standard_normal((B, T, d)) for _ in range(3))
    R = rng.standard_normal((B, T, d))
    y, cache = attention_forward(on(xp, q), on(xp, k), on(xp, v), H, chunk=chunk)
    assert rel_err(y, attention_reference(q, k, v, H)) < 1e-13
    grads = attention_backward(on(xp, R), cache)
    for i, got in enumerate(grads):
        args = [q, k, v]

        def f(h, i=i, args=args):
            a = list(args)
            a[i] = h
            out = attention_forward(*(on(xp, t) for t in a), H, chunk=chunk)[0]
            return float(np.sum(to_host(out) * R))
        err = rel_err(got, fd_grad(f, args[i].copy()))
        assert err < FD_TOL, ("qkv"[i], err)


@pytest.mark.parametrize("T,chunk", [(130, 64), (128, 64), (64, 16), (9, 4)])
def test_causal_chunks_equal_the_whole_product(xp, rng, T, chunk):
    """The chunked causal path against the one (T, T) product it replaces: output and all
    three gradients to 1e-13 (float64), uneven last chunks included."""
    B, d, H = 2, 8, 2
    q, k, v, R = (on(xp, rng.standard_normal((B, T, d))) for _ in range(4))
    y0, c0 = attention_forward(q, k, v, H, chunk=None)
    y1, c1 = attention_forward(q, k, v, H, chunk=chunk)
    assert isinstance(c1[3], list) and len(c1[3]) == -(-T // chunk)   # it did run in chunks
    assert rel_err(y1, y0) < 1e-13
    for got, want in zip(attention_backward(R, c1), attention_backward(R, c0)):
        assert rel_err(got, want) < 1e-13


def test_attention_is_causal_and_stable(xp, rng):
    q, k, v = (rng.standard_normal((1, 5, 4)) for _ in range(3))
    y1, _ = attention_forward(on(xp, q), on(xp, k), on(xp, v), 2)
    k2, v2 = k.copy(), v.copy()
    k2[:, 3:] += 10.0
    v2[:, 3:] -= 7.0                                            # change only the future
    y2, _ = attention_forward(on(xp, q), on(xp, k2), on(xp, v2), 2)
    np.testing.assert_allclose(to_host(y1)[:, :3], to_host(y2)[:, :3], rtol=1e-12)
    big, _ = attention_forward(on(xp, q * 1e3), on(xp, k * 1e3), on(xp, v), 2)
    assert backend.is_finite(big)                               # no overflow in the softmax


def test_cross_entropy_forward_and_fd(xp, rng):
    B, T, V = 2, 3, 5
    z = rng.standard_normal((B, T, V)) * 3.0
    t = np.array([[0, 4, 4], [2, 1, 0]])
    loss, cache = cross_entropy_forward(on(xp, z), on(xp, t))
    assert isinstance(loss, float)
    zz = z.reshape(-1, V)
    lse = np.log(np.exp(zz - zz.max(1, keepdims=True)).sum(1)) + zz.max(1)
    ref = float(np.mean(lse - zz[np.arange(B * T), t.reshape(-1)]))
    assert abs(loss - ref) < 1e-14 * abs(ref)
    dz = cross_entropy_backward(cache)
    fd = fd_grad(lambda h: cross_entropy_forward(on(xp, h), on(xp, t))[0], z.copy())
    err = rel_err(dz, fd)
    assert err < FD_TOL, err
    with pytest.raises(RuntimeError, match="already used"):
        cross_entropy_backward(cache)


def test_cross_entropy_scales_with_dloss(xp, rng):
    z = on(xp, rng.standard_normal((1, 2, 3)))
    t = on(xp, np.array([[1, 2]]))
    d1 = cross_entropy_backward(cross_entropy_forward(z, t)[1])
    d3 = cross_entropy_backward(cross_entropy_forward(z, t)[1], dloss=3.0)
    assert rel_err(d3, 3.0 * to_host(d1)) < 1e-15


@pytest.mark.parametrize("bad", [[[0, 5]], [[-1, 0]]])
def test_cross_entropy_rejects_out_of_range_targets(xp, bad):
    z = on(xp, np.zeros((1, 2, 5)))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        cross_entropy_forward(z, on(xp, np.array(bad)))


def test_cross_entropy_rejects_bad_shape_and_dtype(xp):
    z = on(xp, np.zeros((1, 2, 5)))
    with pytest.raises(ValueError, match="shape"):
        cross_entropy_forward(z, on(xp, np.array([[0, 1, 2]])))
    with pytest.raises(ValueError, match="integer"):
        cross_entropy_forward(z, on(xp, np.array([[0.0, 1.0]])))


def test_ops_keep_float32(xp, rng):
    f32 = lambda s: on(xp, rng.standard_normal(s).astype(np.float32))   # noqa: E731
    x = f32((2, 3, 4))
    assert layernorm_forward(x, f32(4), f32(4))[0].dtype == np.float32
    assert gelu_forward(x)[0].dtype == np.float32
    y, cache = attention_forward(x, f32((2, 3, 4)), f32((2, 3, 4)), 2)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in attention_backward(f32((2, 3, 4)), cache))
    _, c = cross_entropy_forward(x, on(xp, np.array([[0, 1, 3], [2, 2, 0]])))
    assert cross_entropy_backward(c).dtype == np.float32
