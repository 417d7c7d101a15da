"""LoRA / rsLoRA parity against independent oracles (docs/variants.md#lora, contract item 3).

* ``reference.naive``       — dense float64 NumPy formulas:      rel. error < 1e-12;
* ``reference.torch_twin``  — torch autograd, float64:            rel. error < 1e-10;
* ``reference.peft_parity`` — PEFT itself, float32 (LoRA, rsLoRA, PiSSA, OLoRA): < 1e-5.

Every test runs over the ``xp`` backends (numpy, numpy-strict, cupy when present): host arrays go
in with ``xp.asarray`` and come back with ``backend.to_numpy``. Run with ``-s`` to see the
largest relative error of each comparison.
"""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import lowrank as lr  # noqa: E402
from lowrank import backend  # noqa: E402
from reference import finite_diff, naive, peft_parity, torch_twin  # noqa: E402

from tests.helpers.common import error_log  # noqa: E402

M, N_IN, R, N = 24, 16, 4, 10          # out_features, in_features, rank, rows
ALPHA = 8.0
P_DROP = 0.25
TOL64_NAIVE, TOL64_TORCH, TOL32_PEFT = 1e-12, 1e-10, 1e-5

ERRORS, _report_errors = error_log("reference parity")


def check(label, ours, ref, tol):
    err = finite_diff.rel_error(backend.to_numpy(ours), ref)
    ERRORS.check(label, err, tol)


# --- inputs -----------------------------------------------------------------------------------

def spectral_W0(m=M, n=N_IN, seed=0, decay=0.8):
    """``Q1 diag(σ) Q2ᵀ`` with σ_i = 2·decay^i: a well-separated spectrum, so float32 SVDs agree."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    Q1, _ = np.linalg.qr(rng.standard_normal((m, k)))
    Q2, _ = np.linalg.qr(rng.standard_normal((n, k)))
    sigma = 2.0 * decay ** np.arange(k)
    return (Q1 * sigma) @ Q2.T


def problem(seed=0, lead=(N,)):
    """Host float64 ``W0, b0, x, G, mask, A, B`` (A, B random and nonzero)."""
    rng = np.random.default_rng(100 + seed)
    W0 = spectral_W0(seed=seed)
    b0 = rng.standard_normal(M)
    x = rng.standard_normal((*lead, N_IN))
    G = rng.standard_normal((*lead, M))
    mask = (rng.random(x.shape) >= P_DROP) / (1.0 - P_DROP)
    A = rng.standard_normal((R, N_IN)) / math.sqrt(N_IN)
    B = rng.standard_normal((M, R))
    return W0, b0, x, G, mask, A, B


def make_layer(xp, W0, b0, dtype, seed=0, **cfg):
    cfg.setdefault("r", R)
    cfg.setdefault("alpha", ALPHA)
    config = lr.adapters.config("lora", **cfg)
    b = None if b0 is None else xp.asarray(b0, dtype=dtype)
    return lr.adapters.AdaptedLinear(xp.asarray(W0, dtype=dtype), b, config, seed=seed)


def set_factors(layer, xp, A, B):
    dtype = layer.dtype
    layer.lora_A.data[...] = xp.asarray(np.asarray(A), dtype=dtype)
    layer.lora_B.data[...] = xp.asarray(np.asarray(B), dtype=dtype)


def run(layer, xp, x, G, mask=None):
    """Forward + backward; host arrays y, dA, dB, dx, db (db None if the bias is frozen)."""
    dtype = layer.dtype
    xd = xp.asarray(x, dtype=dtype)
    md = None if mask is None else xp.asarray(mask, dtype=dtype)
    y, cache = layer.forward(xd, dropout_mask=md)
    layer.zero_grad()
    dx = layer.backward(xp.asarray(G, dtype=dtype), cache)
    bias = layer.bias
    assert layer.weight.grad is None, "W0 got a gradient"
    return {"y": backend.to_numpy(y), "dx": backend.to_numpy(dx),
            "dA": backend.to_numpy(layer.lora_A.grad), "dB": backend.to_numpy(layer.lora_B.grad),
            "db": backend.to_numpy(bias.grad) if bias is not None and bias.trainable else None}


# --- the oracles check themselves -------------------------------------------------------------

def test_naive_grads_match_finite_differences():
    """The hand-written oracle gradients agree with central differences of the oracle forward."""
    W0, b0, x, G, mask, A, B = problem(seed=1, lead=(3,))
    s = 0.7
    grads = naive.lora_grads(x, W0, b0, A, B, s, G, mask)
    arrays = {"dA": A, "dB": B, "dx": x, "db": b0}
    for name, arr in arrays.items():
        num = finite_diff.numerical_gradient(
            lambda: float(np.sum(naive.lora_forward(x, W0, b0, A, B, s, mask) * G)), arr)
        err = finite_diff.rel_error(grads[name], num)
        ERRORS.check(f"naive vs finite diff {name}", err, 1e-8)


def test_optimal_residual_norm_is_eckart_young():
    W0 = spectral_W0()
    S = 2.0 * 0.8 ** np.arange(min(M, N_IN))
    assert naive.optimal_residual_norm(W0, R) == pytest.approx(np.sqrt(np.sum(S[R:] ** 2)), rel=1e-12)
    assert naive.optimal_residual_norm(W0, min(M, N_IN)) == pytest.approx(0.0, abs=1e-12)


def test_rel_error_conventions():
    assert finite_diff.rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert finite_diff.rel_error(np.ones(4), 2 * np.ones(4)) == pytest.approx(0.5)


# --- lowrank vs naive float64 -----------------------------------------------------------------

@pytest.mark.parametrize("use_mask", [False, True], ids=["nodrop", "mask"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_lowrank_matches_naive_float64(xp, use_mask, rslora, bias):
    W0, b0, x, G, mask, A, B = problem()
    mask = mask if use_mask else None
    layer = make_layer(xp, W0, b0, "float64", rslora=rslora, bias=bias,
                       dropout=P_DROP if use_mask else 0.0)
    set_factors(layer, xp, A, B)
    s = ALPHA / math.sqrt(R) if rslora else ALPHA / R
    assert layer.scaling == s
    got = run(layer, xp, x, G, mask)
    assert got["y"].dtype == np.float64
    check("naive f64 y", got["y"], naive.lora_forward(x, W0, b0, A, B, s, mask), TOL64_NAIVE)
    check("naive f64 delta", layer.delta_weight(), s * (B @ A), TOL64_NAIVE)
    ref = naive.lora_grads(x, W0, b0, A, B, s, G, mask)
    for name in ("dA", "dB", "dx"):
        check(f"naive f64 {name}", got[name], ref[name], TOL64_NAIVE)
    if bias == "lora_only":
        check("naive f64 db", got["db"], ref["db"], TOL64_NAIVE)
    else:
        assert got["db"] is None and layer.bias.grad is None


def test_lowrank_matches_naive_batched_input(xp):
    """``(..., n)`` inputs: a (2, 5, n) batch with a dropout mask and no base bias."""
    W0, _, x, G, mask, A, B = problem(seed=2, lead=(2, 5))
    layer = make_layer(xp, W0, None, "float64", dropout=P_DROP)
    set_factors(layer, xp, A, B)
    got = run(layer, xp, x, G, mask)
    s = ALPHA / R
    assert got["y"].shape == (2, 5, M) and got["dx"].shape == (2, 5, N_IN)
    check("naive f64 y", got["y"], naive.lora_forward(x, W0, None, A, B, s, mask), TOL64_NAIVE)
    ref = naive.lora_grads(x, W0, None, A, B, s, G, mask)
    for name in ("dA", "dB", "dx"):
        check(f"naive f64 {name}", got[name], ref[name], TOL64_NAIVE)


def test_kaiming_init_first_step(xp):
    """At the kaiming init B = 0: output == base output, dA == 0 exactly, dB matches naive."""
    W0, b0, x, G, _, _, _ = problem(seed=3)
    layer = make_layer(xp, W0, b0, "float64")
    A = backend.to_numpy(layer.lora_A.data)
    assert np.all(backend.to_numpy(layer.lora_B.data) == 0.0)
    got = run(layer, xp, x, G)
    np.testing.assert_array_equal(got["dA"], np.zeros_like(A))
    check("naive f64 y", got["y"], x @ W0.T + b0, TOL64_NAIVE)
    ref = naive.lora_grads(x, W0, b0, A, np.zeros((M, R)), ALPHA / R, G)
    check("naive f64 dB", got["dB"], ref["dB"], TOL64_NAIVE)


def test_lowrank_gradients_match_finite_differences(xp):
    """finite_diff perturbs lowrank's own parameter arrays in place (any backend)."""
    W0, b0, x, G, mask, A, B = problem(seed=4, lead=(3,))
    layer = make_layer(xp, W0[:6, :5], b0[:6], "float64", r=2, dropout=P_DROP, bias="lora_only")
    set_factors(layer, xp, A[:2, :5], B[:6, :2])
    x, G, mask = x[:, :5], G[:, :6], mask[:, :5]
    got = run(layer, xp, x, G, mask)
    xd, Gd, md = (xp.asarray(a) for a in (x, G, mask))

    def loss():
        y, _ = layer.forward(xd, dropout_mask=md)
        return float(backend.to_numpy((y * Gd).sum()))

    for name, param in (("dA", layer.lora_A), ("dB", layer.lora_B), ("db", layer.bias)):
        num = finite_diff.numerical_gradient(loss, param.data)
        check(f"finite diff f64 {name}", got[name], num, 1e-8)
    check("finite diff f64 dx", got["dx"], finite_diff.numerical_gradient(loss, xd), 1e-8)


# --- lowrank vs the torch twin (autograd) float64 ---------------------------------------------

@pytest.mark.parametrize("use_mask", [False, True], ids=["nodrop", "mask"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lowrank_matches_torch_autograd_float64(xp, use_mask, rslora):
    W0, b0, x, G, mask, A, B = problem(seed=5)
    mask = mask if use_mask else None
    layer = make_layer(xp, W0, b0, "float64", rslora=rslora, bias="lora_only",
                       dropout=P_DROP if use_mask else 0.0)
    set_factors(layer, xp, A, B)
    got = run(layer, xp, x, G, mask)
    ref = torch_twin.autograd_grads(W0, b0, A, B, layer.scaling, x, G, mask, train_bias=True)
    for name in ("y", "dA", "dB", "dx", "db"):
        check(f"torch f64 {name}", got[name], ref[name], TOL64_TORCH)


# --- lowrank vs PEFT float32 ------------------------------------------------------------------

@pytest.mark.parametrize("r", [3, R])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_scaling_and_kaiming_init(xp, rslora, r):
    W0, b0, x, _, _, _, _ = problem(seed=6)
    layer = make_layer(xp, W0, b0, "float32", rslora=rslora, r=r, alpha=5.0)
    ref = peft_parity.peft_init(W0, b0, r, 5.0, rslora=rslora, init="kaiming")
    assert layer.scaling == pytest.approx(ref["scaling"], rel=1e-15)
    assert layer.scaling == pytest.approx(5.0 / math.sqrt(r) if rslora else 5.0 / r, rel=1e-15)
    bound = 1.0 / math.sqrt(N_IN)
    for A_, B_ in ((backend.to_numpy(layer.lora_A.data), backend.to_numpy(layer.lora_B.data)),
                   (ref["lora_A"], ref["lora_B"])):
        assert A_.shape == (r, N_IN) and B_.shape == (M, r)
        assert np.all(np.abs(A_) <= bound) and np.abs(A_).max() > 0.5 * bound
        assert np.all(B_ == 0.0)
    # at init both leave the base weight untouched
    np.testing.assert_array_equal(backend.to_numpy(layer.weight.data), W0.astype(np.float32))
    np.testing.assert_array_equal(ref["weight"], W0.astype(np.float32).astype(np.float64))


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_peft_lora_forward_backward_float32(xp, rslora, bias):
    """Our kaiming A plus a nonzero B, copied into PEFT: same y, dA, dB, dx (and db)."""
    W0, b0, x, G, _, _, B = problem(seed=7)
    layer = make_layer(xp, W0, b0, "float32", rslora=rslora, bias=bias, seed=3)
    A = backend.to_numpy(layer.lora_A.data)
    set_factors(layer, xp, A, B)
    got = run(layer, xp, x, G)
    assert got["y"].dtype == np.float32 and got["dA"].dtype == np.float32
    ref = peft_parity.peft_forward_backward(W0.astype(np.float32), b0.astype(np.float32), A, B,
                                            R, ALPHA, x.astype(np.float32), G.astype(np.float32),
                                            rslora=rslora, bias=bias)
    assert not ref["frozen_weight_grad"]
    assert layer.scaling == pytest.approx(ref["scaling"], rel=1e-15)
    tag = "rslora" if rslora else "lora"
    check(f"peft f32 {tag} s*BA", layer.delta_weight(), ref["delta"], TOL32_PEFT)
    for name in ("y", "dA", "dB", "dx"):
        check(f"peft f32 {tag} {name}", got[name], ref[name], TOL32_PEFT)
    if bias == "lora_only":
        check(f"peft f32 {tag} db", got["db"], ref["db"], TOL32_PEFT)
    else:
        assert ref["db"] is None and got["db"] is None


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_data_driven_init_float32(xp, init, rslora):
    """PiSSA / OLoRA from the same W0: same s·BA and residual base (products, not factors:
    SVD/QR signs may differ); then PEFT's factors in our layer give the same y, dA, dB, dx."""
    W0, b0, x, G, _, _, _ = problem(seed=8)
    W0_32 = W0.astype(np.float32)
    layer = make_layer(xp, W0_32, b0, "float32", init=init, rslora=rslora)
    ref = peft_parity.peft_init(W0_32, b0.astype(np.float32), R, ALPHA, rslora=rslora, init=init)
    tag = f"{init}{'+rslora' if rslora else ''}"
    assert layer.scaling == pytest.approx(ref["scaling"], rel=1e-15)
    assert layer.weight.dtype == np.float32 and layer.lora_A.dtype == np.float32
    check(f"peft f32 {tag} s*BA", layer.delta_weight(), ref["delta"], TOL32_PEFT)
    check(f"peft f32 {tag} residual", layer.weight.data, ref["weight"], TOL32_PEFT)
    if init == "pissa":   # the residual is the Eckart–Young optimum (both sides)
        opt = naive.optimal_residual_norm(W0_32, R)
        assert np.linalg.norm(backend.to_numpy(layer.weight.data)) == pytest.approx(opt, rel=1e-5)
        assert np.linalg.norm(ref["weight"]) == pytest.approx(opt, rel=1e-5)

    set_factors(layer, xp, ref["lora_A"], ref["lora_B"])
    got = run(layer, xp, x, G)
    out = peft_parity.peft_forward_backward(ref["weight"], b0.astype(np.float32), ref["lora_A"],
                                            ref["lora_B"], R, ALPHA, x.astype(np.float32),
                                            G.astype(np.float32), rslora=rslora)
    for name in ("y", "dA", "dB", "dx"):
        check(f"peft f32 {tag} {name}", got[name], out[name], TOL32_PEFT)
    # and the adapted layer still computes the original map, as PEFT's does
    check(f"peft f32 {tag} y vs x W0ᵀ+b0", got["y"],
          x.astype(np.float32) @ W0_32.T + b0.astype(np.float32), TOL32_PEFT)
