"""The adapter contract (SPEC §2, items 1–5), run over every registered variant.

A new variant gets this battery by registering itself; ``CASES`` may list extra configs
that exercise its options (inits, flags). Float64 for gradients, on every backend.
"""
import contextlib

import numpy as np
import pytest

import lowrank as lr
from lowrank import backend

from .helpers import layer_fd_gradient, rel_err

CASES = {
    "lora": [dict(init=i) for i in ("kaiming", "gaussian", "pissa", "pissa_niter_2", "olora",
                                    "milora")] + [dict(rslora=True), dict(bias="lora_only")],
    "svd": [dict(train=("U", "S")), dict(train=("V",)), dict(train=("S",)),
            dict(method="randomized", n_iter=1), dict(bias="lora_only")],
    "dora": [dict(exact_norm_grad=True), dict(rslora=True),
             dict(rslora=True, exact_norm_grad=True), dict(bias="lora_only")],
    "adalora": [dict(bias="lora_only"), dict(init_r=3, target_r=2),
                dict(orth_squared=True, tinit=1, tfinal=1, total_step=5)],
    "sora": [dict(gate_optimizer="sgd"), dict(lambda_schedule="linear", max_lambda=0.01),
             dict(bias="lora_only")],
    # at the default config S is empty until training chooses its support: exercise it here
    "rosa": [dict(support="random"), dict(support="random", density=0.5),
             dict(support="random", density=1.0, bias="all")],
    "increlora": [dict(init_r=2), dict(bias="lora_only"), dict(init_r=1, add_r=1, total_budget=3)],
    "relora": [dict(bias="lora_only"), dict(optimizer_reset="magnitude", reset_ratio=0.5)],
}
M, N, R, ROWS = 6, 5, 2, 4


def _cases():
    for name in lr.adapters.available():
        for extra in [{}] + CASES.get(name, []):
            label = ",".join(f"{k}={v}" for k, v in extra.items()) or "default"
            yield pytest.param(name, extra, id=f"{name}[{label}]")


def cases():
    return list(_cases())


def make_layer(xp, name, extra, dtype="float64", seed=0, **overrides):
    rng = np.random.default_rng(seed)
    W0 = xp.asarray(rng.standard_normal((M, N)), dtype=dtype)
    b0 = xp.asarray(rng.standard_normal(M), dtype=dtype)
    cfg = lr.adapters.config(name, **{"r": R, "alpha": 3.0, **extra, **overrides})
    return lr.adapters.AdaptedLinear(W0, b0, cfg, seed=seed), W0, b0


def perturb(layer, xp, seed=1):
    """Move every trainable array off its init so no gradient is trivially zero."""
    rng = np.random.default_rng(seed)
    for _, p in layer.named_parameters(trainable_only=True):
        p.data += xp.asarray(0.5 * rng.standard_normal(p.shape), dtype=p.dtype)


def loss_and_grads(layer, x, G, mask=None):
    layer.zero_grad()
    y, cache = layer.forward(x, dropout_mask=mask)
    dx = layer.backward(G, cache)
    return float((y * G).sum()), dx


@pytest.mark.parametrize("name,extra", cases())
def test_init_output_equals_base_output(xp, name, extra):
    layer, W0, b0 = make_layer(xp, name, extra)
    x = xp.asarray(np.random.default_rng(5).standard_normal((2, ROWS, N)))
    y, _ = layer.eval().forward(x)
    assert y.shape == (2, ROWS, M)
    assert rel_err(y, x @ W0.T + b0) < 1e-13


@pytest.mark.parametrize("name,extra", cases())
def test_forward_is_the_dense_delta_and_merge_round_trips(xp, name, extra):
    layer, W0, b0 = make_layer(xp, name, extra)
    perturb(layer, xp)
    layer.eval()
    x = xp.asarray(np.random.default_rng(6).standard_normal((ROWS, N)))
    y, _ = layer.forward(x)
    base = layer.weight.data.copy()
    bias = layer.bias.data
    assert rel_err(y, x @ (base + layer.delta_weight()).T + bias) < 1e-13
    layer.merge()
    y_merged, _ = layer.forward(x)
    assert rel_err(y_merged, y) < 1e-13
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert rel_err(layer.weight.data, base) < 1e-13
    assert rel_err(layer.forward(x)[0], y) < 1e-13


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout-mask"])
@pytest.mark.parametrize("name,extra", cases())
def test_gradients_match_finite_differences(xp, name, extra, with_mask):
    layer, _, _ = make_layer(xp, name, extra, dropout=0.3 if with_mask else 0.0)
    perturb(layer, xp)
    rng = np.random.default_rng(7)
    x = xp.asarray(rng.standard_normal((ROWS, N)))
    G = xp.asarray(rng.standard_normal((ROWS, M)))
    mask = xp.asarray((rng.random((ROWS, N)) > 0.3) / 0.7) if with_mask else None
    _, dx = loss_and_grads(layer, x, G, mask)
    analytic = {name: p.grad.copy() for name, p in layer.named_parameters(trainable_only=True)}
    assert analytic, "a variant with nothing to train"
    arrays = {name: p.data for name, p in layer.named_parameters(trainable_only=True)}
    arrays["x"], analytic["x"] = x, dx
    # a layer whose backward treats part of the map as a constant (DoRA's detached norm) says
    # so with finite_difference_context(): inside it, the forward holds that part fixed
    fd_context = getattr(layer, "finite_difference_context", contextlib.nullcontext)
    with fd_context():
        for pname, array in arrays.items():
            numeric = layer_fd_gradient(layer, array, x, G, mask)
            assert rel_err(analytic[pname], numeric) < 1e-6, pname


@pytest.mark.parametrize("name,extra", cases())
def test_frozen_base_gets_no_gradient_and_float32_stays_float32(xp, name, extra):
    layer, _, _ = make_layer(xp, name, extra, dtype="float32")
    perturb(layer, xp)
    x = xp.asarray(np.ones((ROWS, N)), dtype="float32")
    y, cache = layer.forward(x)
    layer.zero_grad()
    dx = layer.backward(xp.ones_like(y), cache)
    assert y.dtype == np.float32 and dx.dtype == np.float32
    assert not layer.weight.trainable and layer.weight.grad is None
    for pname, p in layer.named_parameters(trainable_only=True):
        assert p.grad.dtype == np.float32, pname


@pytest.mark.parametrize("name", lr.adapters.available())
@pytest.mark.parametrize("field,value", [("r", 0), ("r", -2), ("r", 1.5), ("alpha", 0.0),
                                         ("alpha", -1.0), ("dropout", 1.0), ("dropout", -0.1),
                                         ("bias", "some")])
def test_invalid_config_raises_naming_the_field(name, field, value):
    with pytest.raises(ValueError, match=rf"^{field} "):
        lr.adapters.config(name, **{field: value})


@pytest.mark.parametrize("name", lr.adapters.available())
def test_rank_above_min_dim_raises(xp, name):
    with pytest.raises(ValueError, match=r"r must be an integer in 1\.\.min\(m, n\) = 1\.\.5"):
        make_layer(xp, name, {}, r=6)


@pytest.mark.parametrize("name", lr.adapters.available())
def test_bad_inputs_raise(xp, name):
    layer, _, _ = make_layer(xp, name, {})
    with pytest.raises(ValueError, match="trailing size 5"):
        layer.forward(xp.ones((ROWS, N + 1)))
    with pytest.raises(ValueError, match="dtype"):
        layer.forward(xp.ones((ROWS, N), dtype="float32"))
    other = backend.namespace("numpy-strict" if xp is np else "numpy")
    with pytest.raises(ValueError, match="different backends"):
        layer.forward(other.ones((ROWS, N)))
    with pytest.raises(ValueError, match="unknown field"):
        lr.adapters.config(name, rank=4)


def test_unknown_variant_and_init_raise():
    with pytest.raises(ValueError, match="unknown adapter variant 'vera'.*registered"):
        lr.adapters.config("vera")
    with pytest.raises(ValueError, match="^init must be one of"):
        lr.adapters.config("lora", init="xavier")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_1", "olora", "milora"])
def test_non_finite_weight_for_svd_init_raises(xp, init):
    W0 = np.ones((M, N))
    W0[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        lr.adapters.AdaptedLinear(xp.asarray(W0), None, lr.adapters.config("lora", r=2, init=init))


def test_kaiming_init_has_zero_dA_on_the_first_step(xp):
    layer, _, _ = make_layer(xp, "lora", {})
    x = xp.asarray(np.random.default_rng(0).standard_normal((ROWS, N)))
    loss_and_grads(layer, x, xp.ones((ROWS, M)))
    assert float(abs(layer.lora_A.grad).max()) == 0.0
    assert float(abs(layer.lora_B.grad).max()) > 0.0
