"""The ``dora`` variant (docs/variants.md#dora): gradients in both norm modes, merge, init, bad
inputs.

Finite differences of the full map see n = ‖W0 + s·BA‖_rows move with A and B. The default
(detached, PEFT) gradient treats n as a constant, so it is checked against finite differences
taken inside ``layer.hold_norm()``; ``exact_norm_grad=True`` is checked against plain ones.
Run with ``-s`` to see the largest relative error per array and mode.
"""
import contextlib
import functools

import numpy as np
import pytest

import lowrank as lr

from tests.helpers.common import error_log, gradient_errors, make_layer, perturb, problem, rel_err, to_host

M, N, R, ROWS = 6, 5, 2, 4
ERRORS, _report_errors = error_log("dora")
make = functools.partial(make_layer, variant="dora", shape=(M, N), r=R, alpha=3.0)


MODES = [(False, False), (False, True), (True, False), (True, True)]
MODE_IDS = ["detached-plain", "detached-mask", "exact-plain", "exact-mask"]


@pytest.mark.parametrize("bias", ["none", "lora_only"])
@pytest.mark.parametrize("exact,with_mask", MODES, ids=MODE_IDS)
def test_gradients_match_finite_differences(xp, exact, with_mask, bias):
    layer, _, _ = make(xp, exact_norm_grad=exact, dropout=0.3 if with_mask else 0.0, bias=bias)
    perturb(layer, xp)
    x, G, mask = problem(xp, (M, N), ROWS, dropout=0.3 if with_mask else 0.0)
    # detached: n held at its value here; exact: the full map (== finite_difference_context())
    context = contextlib.nullcontext() if exact else layer.hold_norm()
    errors = gradient_errors(layer, x, G, mask, context)
    assert set(errors) == {"lora_A", "lora_B", "lora_magnitude_vector", "x"} | (
        {"bias"} if bias != "none" else set())
    mode = f"{'exact' if exact else 'detached'} {'mask' if with_mask else 'plain'}"
    for name, err in errors.items():
        ERRORS.check(f"{mode} {name}", err)
    assert layer.weight.grad is None


@pytest.mark.parametrize("with_mask", [False, True], ids=["plain", "mask"])
def test_detached_gradient_is_not_the_full_gradient(xp, with_mask):
    """Why the FD above needs hold_norm(): the norm's share of dA, dB is far above tolerance,
    while dm and dx do not involve it; and finite_difference_context() picks the right FD."""
    layer, _, _ = make(xp, dropout=0.3 if with_mask else 0.0)
    perturb(layer, xp)
    x, G, mask = problem(xp, (M, N), ROWS, dropout=0.3 if with_mask else 0.0)
    full = gradient_errors(layer, x, G, mask, contextlib.nullcontext())
    assert full["lora_A"] > 1e-3 and full["lora_B"] > 1e-3
    assert full["lora_magnitude_vector"] < 1e-6 and full["x"] < 1e-6
    for exact in (False, True):
        layer.config.exact_norm_grad = exact
        assert max(gradient_errors(layer, x, G, mask).values()) < 1e-6
    assert layer._held_norm is None          # the context restored the live norm


def test_three_d_input_matches_flattened(xp):
    layer, _, _ = make(xp, exact_norm_grad=True, dropout=0.3)
    perturb(layer, xp)
    x, G, mask = problem(xp, (M, N), (2, 3), dropout=0.3)
    layer.zero_grad()
    y, cache = layer.forward(x, dropout_mask=mask)
    dx = layer.backward(G, cache)
    grads3 = {n: p.grad.copy() for n, p in layer.named_parameters(trainable_only=True)}
    layer.zero_grad()
    y2, cache2 = layer.forward(x.reshape(6, N), dropout_mask=mask.reshape(6, N))
    dx2 = layer.backward(G.reshape(6, M), cache2)
    assert y.shape == (2, 3, M) and dx.shape == (2, 3, N)
    assert rel_err(y, y2.reshape(2, 3, M)) < 1e-15 and rel_err(dx, dx2.reshape(2, 3, N)) < 1e-15
    for n, p in layer.named_parameters(trainable_only=True):
        assert rel_err(grads3[n], p.grad) < 1e-15


def test_init_magnitude_is_row_norm_and_output_is_base(xp):
    layer, W0, b0 = make(xp)
    W = to_host(W0)
    np.testing.assert_array_equal(to_host(layer.lora_B.data), 0.0)
    np.testing.assert_allclose(to_host(layer.lora_magnitude_vector.data),
                               np.linalg.norm(W, axis=1), rtol=1e-15)
    x = xp.asarray(np.random.default_rng(2).standard_normal((2, ROWS, N)))
    assert rel_err(layer.eval().forward(x)[0], x @ W0.T + b0) < 1e-15
    # B = 0: dA is zero on the first step in both modes (the exact term carries a factor B)
    for exact in (False, True):
        layer.config.exact_norm_grad = exact
        layer.train().zero_grad()
        y, cache = layer.forward(x)
        layer.backward(xp.ones_like(y), cache)
        assert float(abs(layer.lora_A.grad).max()) == 0.0
        assert float(abs(layer.lora_B.grad).max()) > 0.0


def test_forward_matches_dense_formulas(xp):
    layer, W0, b0 = make(xp, dropout=0.3)
    perturb(layer, xp)
    x, _, mask = problem(xp, (M, N), ROWS, dropout=0.3)
    A, B, mag = (to_host(p.data) for p in (layer.lora_A, layer.lora_B,
                                           layer.lora_magnitude_vector))
    Wh, xh, maskh, bh, s = to_host(W0), to_host(x), to_host(mask), to_host(b0), layer.scaling
    V = Wh + s * B @ A
    c = mag / np.linalg.norm(V, axis=1)
    xd = xh * maskh
    expect = xh @ Wh.T + bh + (c - 1) * (xd @ Wh.T) + c * (s * (xd @ A.T) @ B.T)
    assert rel_err(layer.forward(x, dropout_mask=mask)[0], expect) < 1e-14
    assert rel_err(layer.eval().forward(x)[0], xh @ (c[:, None] * V).T + bh) < 1e-14
    assert rel_err(layer.delta_weight(), c[:, None] * V - Wh) < 1e-14


def test_merge_unmerge_round_trip(xp):
    layer, W0, b0 = make(xp, exact_norm_grad=True)
    perturb(layer, xp)
    layer.eval()
    x, _, _ = problem(xp, (M, N), ROWS)
    y, _ = layer.forward(x)
    delta = layer.delta_weight()
    layer.merge()
    assert rel_err(layer.weight.data, W0 + delta) < 1e-14
    assert rel_err(layer.forward(x)[0], y) < 1e-14
    assert rel_err(layer.delta_weight(), delta) < 1e-13     # W0 recovered while merged
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        layer.backward(xp.ones((ROWS, M)), None)
    layer.unmerge()
    assert rel_err(layer.weight.data, W0) < 1e-14
    assert rel_err(layer.forward(x)[0], y) < 1e-14
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    # float32: merge and unmerge stay float32 and restore W0 to float32 rounding
    layer32, W32, _ = make(xp, dtype="float32")
    perturb(layer32, xp)
    layer32.merge()
    assert layer32.weight.data.dtype == np.float32
    layer32.unmerge()
    assert layer32.weight.data.dtype == np.float32 and rel_err(layer32.weight.data, W32) < 1e-6


def test_merge_refuses_zero_magnitude(xp):
    layer, W0, _ = make(xp)
    layer.lora_magnitude_vector.data[2] = 0.0
    with pytest.raises(RuntimeError, match="cannot merge"):
        layer.merge()
    assert not layer.merged and rel_err(layer.weight.data, W0) == 0.0


@pytest.mark.parametrize("field,value", [("exact_norm_grad", "yes"), ("exact_norm_grad", 1),
                                         ("rslora", "true"), ("r", 0), ("alpha", -1.0),
                                         ("dropout", 1.0)])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} "):
        lr.adapters.config("dora", **{field: value})


def test_bad_weights_and_rank_raise(xp):
    with pytest.raises(ValueError, match=r"^r must be an integer in 1\.\.min\(m, n\) = 1\.\.5"):
        make(xp, r=6)
    W0 = np.random.default_rng(0).standard_normal((M, N))
    W0[3] = 0.0
    with pytest.raises(ValueError, match="all-zero row"):
        make(xp, W0=W0)
    W0[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        make(xp, W0=W0)
    layer, _, _ = make(xp)
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        with layer.hold_norm():
            pass


def test_rslora_scaling_and_config_round_trip():
    assert lr.adapters.config("dora", r=4, alpha=8.0).scaling() == 2.0
    assert lr.adapters.config("dora", r=4, alpha=8.0, rslora=True).scaling() == 4.0
    cfg = lr.adapters.config("dora", r=4, exact_norm_grad=True)
    assert lr.adapters.config_from_dict(cfg.to_dict()) == cfg
