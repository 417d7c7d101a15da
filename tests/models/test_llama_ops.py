"""The Llama ops (docs/llama.md): RMSNorm, RoPE, SiLU·up and grouped-query attention. Each
backward against central finite differences in float64 (rel < 1e-6) on every backend, each
forward against a plain NumPy formula, the KV-cache path against the full one, and planted
bugs (a backward with one sign or one sum wrong) that the same check must reject.

The probed scalar is ``L = Σ out ⊙ R`` for a fixed random R, so ``dout = R``.
"""
import math

import numpy as np
import pytest

from lowrank import backend
from lowrank.ops import rope as rope_ops
from lowrank.ops.gqa import gqa_backward, gqa_cached, gqa_forward
from lowrank.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from lowrank.ops.rope import inv_freq, rope_backward, rope_forward, rope_tables
from lowrank.ops.swiglu import swiglu_backward, swiglu_forward
from reference.finite_diff import numerical_gradient
from tests.helpers.common import rel_err, to_host

FD_TOL = 1e-6
FD_EPS = 1e-6
PLANTED = 1e-2      # a wrong backward is off by far more than this


def on(xp, a):
    return backend.asarray(np.asarray(a), xp=xp)


def fd_errors(xp, forward, inputs: dict, backward, R):
    """``{name: rel err}`` of ``backward(R, cache)`` (a dict of gradients) against central
    differences of ``Σ forward(**inputs) ⊙ R`` for each input."""
    arrays = {k: on(xp, v) for k, v in inputs.items()}
    out, cache = forward(**arrays)
    grads = backward(on(xp, R), cache)
    errors = {}
    for name, array in arrays.items():
        if name not in grads:
            continue

        def f():
            return float(np.sum(to_host(forward(**arrays)[0]) * R))
        errors[name] = rel_err(grads[name], numerical_gradient(f, array, FD_EPS))
    return errors


# --- RMSNorm -----------------------------------------------------------------------------------

def rms_inputs(rng):
    return dict(x=rng.standard_normal((2, 3, 6)), weight=1.0 + 0.3 * rng.standard_normal(6))


def rms_forward(x, weight):
    return rmsnorm_forward(x, weight, 1e-5)


def rms_backward(dy, cache):
    dx, dw = rmsnorm_backward(dy, cache)
    return {"x": dx, "weight": dw}


def test_rmsnorm_forward_and_fd(xp, rng):
    inputs = rms_inputs(rng)
    x, w = inputs["x"], inputs["weight"]
    y, _ = rms_forward(on(xp, x), on(xp, w))
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert rel_err(y, ref) < 1e-14
    R = rng.standard_normal(x.shape)
    errors = fd_errors(xp, rms_forward, inputs, rms_backward, R)
    assert max(errors.values()) < FD_TOL, errors


def test_rmsnorm_skips_frozen_weight_gradient(xp, rng):
    inputs = rms_inputs(rng)
    y, cache = rms_forward(on(xp, inputs["x"]), on(xp, inputs["weight"]))
    dx, dw = rmsnorm_backward(on(xp, np.ones(y.shape)), cache, need_dweight=False)
    assert dw is None and dx.shape == y.shape


def test_rmsnorm_float32_statistics_match_float64(rng):
    """float32 in, float32 out, within float32 rounding of the float64 result."""
    x, w = rng.standard_normal((4, 64)) * 30.0, rng.standard_normal(64)
    y32, _ = rmsnorm_forward(x.astype(np.float32), w.astype(np.float32), 1e-6)
    y64, _ = rmsnorm_forward(x, w, 1e-6)
    assert y32.dtype == np.float32 and rel_err(y32, y64) < 1e-6


def test_planted_rmsnorm_bug_is_caught(xp, rng):
    """rstd treated as a constant (no projection term): the check must fail."""
    def wrong(dy, cache):
        xhat, rstd, weight = cache
        return {"x": (dy.reshape(-1, 6) * weight * rstd).reshape(dy.shape)}
    errors = fd_errors(xp, rms_forward, rms_inputs(rng), wrong, rng.standard_normal((2, 3, 6)))
    assert errors["x"] > PLANTED, errors


# --- RoPE --------------------------------------------------------------------------------------

HS = 8


def rope_case(xp, rng, B=2, T=5, H=3, positions=None):
    freq = on(xp, inv_freq(HS, 10000.0))
    pos = np.arange(T)[None].repeat(B, 0) if positions is None else positions
    cos, sin = rope_tables(freq, on(xp, pos), "float64")
    return rng.standard_normal((B, T, H, HS)), cos, sin, pos


def test_rope_forward_turns_each_pair(xp, rng):
    """Pair (x[i], x[i + hs/2]) turns by position · inv_freq_i: a plain rotation."""
    x, cos, sin, pos = rope_case(xp, rng, positions=np.array([[0, 3, 1, 7, 2], [5, 5, 0, 1, 9]]))
    y = to_host(rope_forward(on(xp, x), cos, sin)[0])
    theta = pos[:, :, None, None] * inv_freq(HS, 10000.0)           # (B, T, 1, hs/2)
    a, b = x[..., :HS // 2], x[..., HS // 2:]
    ref = np.concatenate([a * np.cos(theta) - b * np.sin(theta),
                          a * np.sin(theta) + b * np.cos(theta)], axis=-1)
    assert rel_err(y, ref) < 1e-14
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))
    assert np.array_equal(y[0, 0], x[0, 0])                         # position 0: identity


def test_rope_backward_fd(xp, rng):
    x, cos, sin, _ = rope_case(xp, rng)
    errors = fd_errors(xp, lambda x: rope_forward(x, cos, sin), {"x": x},
                       lambda dy, c: {"x": rope_backward(dy, c)}, rng.standard_normal(x.shape))
    assert errors["x"] < FD_TOL, errors


def test_planted_rope_sign_bug_is_caught(xp, rng):
    """The backward applying the forward rotation (rotate_half's sign not flipped)."""
    x, cos, sin, _ = rope_case(xp, rng)

    def wrong(dy, cache):
        cos, sin = cache
        return {"x": dy * cos + rope_ops.rotate_half(dy * sin)}
    errors = fd_errors(xp, lambda x: rope_forward(x, cos, sin), {"x": x}, wrong,
                       rng.standard_normal(x.shape))
    assert errors["x"] > PLANTED, errors


def test_inv_freq_types():
    base = inv_freq(64, 100000.0)
    assert base[0] == 1.0 and math.isclose(base[-1], 100000.0 ** (-62 / 64), rel_tol=1e-15)
    np.testing.assert_array_equal(inv_freq(64, 1e4, "linear", {"factor": 4.0}),
                                  inv_freq(64, 1e4) / 4.0)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    llama3 = inv_freq(16, 1e4, "llama3", scaling)
    wavelen = 2 * math.pi / inv_freq(16, 1e4)
    short, long_ = wavelen < 64 / 4.0, wavelen > 64 / 1.0
    assert short.any() and long_.any() and (~short & ~long_).any()  # all three bands present
    np.testing.assert_array_equal(llama3[short], inv_freq(16, 1e4)[short])
    np.testing.assert_array_equal(llama3[long_], inv_freq(16, 1e4)[long_] / 8.0)
    with pytest.raises(ValueError, match="'yarn'"):
        inv_freq(16, 1e4, "yarn", {"factor": 2.0})


# --- SiLU · up ---------------------------------------------------------------------------------

def test_swiglu_forward_and_fd(xp, rng):
    a, b = 3.0 * rng.standard_normal((3, 7)), rng.standard_normal((3, 7))
    y, _ = swiglu_forward(on(xp, a), on(xp, b))
    assert rel_err(y, a / (1.0 + np.exp(-a)) * b) < 1e-14
    errors = fd_errors(xp, swiglu_forward, {"a": a, "b": b},
                       lambda dy, c: dict(zip("ab", swiglu_backward(dy, c))),
                       rng.standard_normal(a.shape))
    assert max(errors.values()) < FD_TOL, errors


def test_swiglu_is_finite_far_out(xp):
    a = on(xp, np.array([-800.0, -40.0, 0.0, 40.0, 800.0]))
    y, cache = swiglu_forward(a, on(xp, np.ones(5)))
    da, _ = swiglu_backward(on(xp, np.ones(5)), cache)
    np.testing.assert_allclose(to_host(y), [0.0, -40 / (1 + math.exp(40)), 0.0, 40.0, 800.0],
                               atol=1e-15)
    np.testing.assert_allclose(to_host(da), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-14)


def test_planted_swiglu_bug_is_caught(xp, rng):
    """SiLU' taken as σ(a) (the gate's derivative forgotten)."""
    a, b = rng.standard_normal((3, 7)), rng.standard_normal((3, 7))

    def wrong(dy, cache):
        a, b, s = cache
        return {"a": dy * b * s}
    errors = fd_errors(xp, swiglu_forward, {"a": a, "b": b}, wrong,
                       rng.standard_normal(a.shape))
    assert errors["a"] > PLANTED, errors


# --- grouped-query attention -------------------------------------------------------------------

def gqa_reference(q, k, v, key_mask=None):
    """Host float64: transformers' way, with the key/value heads repeated per group."""
    B, T, H, hs = q.shape
    G = H // k.shape[2]
    kr, vr = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)       # (B, T, H, hs)
    s = np.einsum("bqhe,bkhe->bhqk", q, kr) / math.sqrt(hs)
    s = s + np.triu(np.full((T, T), -np.inf), 1)
    if key_mask is not None:
        s = s + np.where(key_mask == 0, np.finfo(np.float64).min, 0.0)[:, None, None, :]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhe->bqhe", p, vr).reshape(B, T, H * hs)


def gqa_inputs(rng, B=2, T=5, H=6, n_kv=2, hs=4):
    return dict(q=rng.standard_normal((B, T, H, hs)), k=rng.standard_normal((B, T, n_kv, hs)),
                v=rng.standard_normal((B, T, n_kv, hs)))


LEFT_PADDED = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
RIGHT_PADDED = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])


@pytest.mark.parametrize("H,n_kv", [(6, 2), (6, 3), (4, 4), (3, 1)])
@pytest.mark.parametrize("mask", [None, LEFT_PADDED, RIGHT_PADDED], ids=["none", "left", "right"])
def test_gqa_forward_and_fd(xp, rng, H, n_kv, mask):
    inputs = gqa_inputs(rng, H=H, n_kv=n_kv)
    key_mask = None if mask is None else on(xp, mask)
    y, _ = gqa_forward(*(on(xp, inputs[n]) for n in "qkv"), key_mask)
    assert rel_err(y, gqa_reference(*inputs.values(), mask)) < 1e-13
    # the loss reads real rows only: a padded query sees padded keys only, whose scores all
    # round to the same lowest value, so finite differences cannot see its (unused) rows
    R = rng.standard_normal(y.shape) * (1 if mask is None else mask[:, :, None])
    errors = fd_errors(xp, lambda q, k, v: gqa_forward(q, k, v, key_mask), inputs,
                       lambda dy, c: dict(zip("qkv", gqa_backward(dy, c))), R)
    assert max(errors.values()) < FD_TOL, errors


def test_gqa_padded_keys_get_and_give_nothing(rng):
    inputs = gqa_inputs(rng)
    y, cache = gqa_forward(*inputs.values(), LEFT_PADDED)
    y2, _ = gqa_forward(inputs["q"], inputs["k"] + (1 - LEFT_PADDED)[:, :, None, None] * 9.0,
                        inputs["v"] + (1 - LEFT_PADDED)[:, :, None, None] * 5.0, LEFT_PADDED)
    real = LEFT_PADDED.astype(bool)
    np.testing.assert_array_equal(y[real], y2[real])                # padded keys: no weight
    R = rng.standard_normal(y.shape) * real[:, :, None]             # loss on real rows only
    dq, dk, dv = gqa_backward(R, cache)
    assert not dk[~real].any() and not dv[~real].any()


def test_planted_gqa_group_sum_bug_is_caught(xp, rng):
    """dK, dV taken from the first query head of each group only (the group sum dropped)."""
    inputs = gqa_inputs(rng, H=6, n_kv=2)

    def wrong(dy, cache):
        B, T, _ = dy.shape
        first = np.zeros((1, 1, 2, 3, 1))
        first[:, :, :, 0] = 1.0                                     # head j·G of each group
        dy_first = dy * on(xp, first.reshape(1, 1, 6, 1).repeat(4, -1).reshape(1, 1, 24))
        dq, _, _ = gqa_backward(dy, cache)
        _, dk, dv = gqa_backward(dy_first, cache)
        return {"q": dq, "k": dk, "v": dv}
    errors = fd_errors(xp, gqa_forward, inputs, wrong, rng.standard_normal((2, 5, 24)))
    assert errors["q"] < FD_TOL and errors["k"] > PLANTED and errors["v"] > PLANTED, errors


@pytest.mark.parametrize("mask", [None, LEFT_PADDED], ids=["none", "left"])
def test_gqa_cached_equals_full(xp, rng, mask):
    """Prefill 2 positions, then one at a time: every row equals the full forward's, and
    the cache holds one key/value head per group."""
    inputs = gqa_inputs(rng)
    q, k, v = (on(xp, inputs[n]) for n in "qkv")
    key_mask = None if mask is None else on(xp, mask)
    full, _ = gqa_forward(q, k, v, key_mask)
    K = xp.zeros((2, 2, 7, 4))
    V = xp.zeros((2, 2, 7, 4))
    rows = [gqa_cached(q[:, :2], k[:, :2], v[:, :2], (K, V), 0,
                       None if mask is None else key_mask[:, :2])]
    for t in range(2, 5):
        rows.append(gqa_cached(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], (K, V), t,
                               None if mask is None else key_mask[:, :t + 1]))
    assert rel_err(xp.concatenate(rows, axis=1), full) < 1e-14
    assert rel_err(K[:, :, :5], inputs["k"].transpose(0, 2, 1, 3)) == 0.0
