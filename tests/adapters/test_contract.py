"""The adapter contract (docs/variants.md#contract), run over every registered variant.

A new variant gets this battery by registering itself; ``CASES`` may list extra configs
that exercise its options (inits, flags). Float64 for gradients, on every backend. Besides
the map itself: save -> load through the adapter files, and the multi-adapter path (the
fast ``delta_forward``/``delta_backward`` where a variant declares it, else the fallback).
"""
import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.formats import checkpoint
from lowrank.models import GPT, GPTConfig
from lowrank.multi.modules import MultiAdapterLinear

from tests.helpers.common import gradient_errors, make_layer, perturb, problem, rel_err

CASES = {
    "lora": [dict(init=i) for i in ("kaiming", "gaussian", "pissa", "pissa_niter_2", "olora",
                                    "milora")] + [dict(rslora=True), dict(bias="lora_only")],
    "svd": [dict(train=("U", "S")), dict(train=("V",)), dict(train=("S",)),
            dict(method="randomized", n_iter=1), dict(bias="lora_only")],
    "dora": [dict(exact_norm_grad=True), dict(rslora=True),
             dict(rslora=True, exact_norm_grad=True), dict(bias="lora_only"),
             dict(init="pissa"), dict(init="olora", exact_norm_grad=True)],
    "adalora": [dict(bias="lora_only"), dict(init_r=3, target_r=2),
                dict(orth_squared=True, tinit=1, tfinal=1, total_step=5)],
    "sora": [dict(gate_optimizer="sgd"), dict(lambda_schedule="linear", max_lambda=0.01),
             dict(bias="lora_only")],
    # at the default config S is empty until training chooses its support: exercise it here
    "rosa": [dict(support="random"), dict(support="random", density=0.5),
             dict(support="random", density=1.0, bias="all"),
             dict(support="random", sparse_input="x_d")],
    "increlora": [dict(init_r=2), dict(bias="lora_only"), dict(init_r=1, add_r=1, total_budget=3)],
    "relora": [dict(bias="lora_only"), dict(optimizer_reset="magnitude", reset_ratio=0.5),
               dict(trainable_scaling=True)],
    "vera": [dict(d_initial=0.5), dict(projection_prng_key=7), dict(bias="lora_only")],
    "loha": [dict(r=1), dict(bias="lora_only")],
    # at the battery's 6x5 shape r=2 factors W2 and r=3 keeps it whole (PEFT's r < max/2 rule)
    "lokr": [dict(r=3), dict(init_weights="lycoris"), dict(decompose_factor=2),
             dict(bias="lora_only")],
}
M, N, R, ROWS = 6, 5, 2, 4
TINY = GPTConfig(vocab_size=32, context=4, n_layer=1, n_head=2, d_model=8)


def _cases():
    for name in lr.adapters.available():
        for extra in [{}] + CASES.get(name, []):
            label = ",".join(f"{k}={v}" for k, v in extra.items()) or "default"
            yield pytest.param(name, extra, id=f"{name}[{label}]")


def cases(delta_path_only=False):
    return [c for c in _cases() if not delta_path_only or c.values[0] in DELTA_PATH]


# variants whose multi-adapter path is the base product plus delta_forward/delta_backward
DELTA_PATH = {name for name in lr.adapters.available()
              if make_layer(np, name, (M, N), r=R)[0].has_delta_path()}


def make(xp, name, extra, dtype="float64", seed=0, **overrides):
    """``(layer, W0, b0)`` of variant ``name`` with the battery's r, α and the case's fields."""
    return make_layer(xp, name, (M, N), dtype, seed, **{"r": R, "alpha": 3.0, **extra,
                                                        **overrides})


def loss_and_grads(layer, x, G, mask=None):
    layer.zero_grad()
    y, cache = layer.forward(x, dropout_mask=mask)
    dx = layer.backward(G, cache)
    return float((y * G).sum()), dx


@pytest.mark.parametrize("name,extra", cases())
def test_init_output_equals_base_output(xp, name, extra):
    layer, W0, b0 = make(xp, name, extra)
    x = xp.asarray(np.random.default_rng(5).standard_normal((2, ROWS, N)))
    y, _ = layer.eval().forward(x)
    assert y.shape == (2, ROWS, M)
    assert rel_err(y, x @ W0.T + b0) < 1e-13


@pytest.mark.parametrize("name,extra", cases())
def test_forward_is_the_dense_delta_and_merge_round_trips(xp, name, extra):
    layer, W0, b0 = make(xp, name, extra)
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
    layer, _, _ = make(xp, name, extra, dropout=0.3 if with_mask else 0.0)
    perturb(layer, xp)
    x, G, mask = problem(xp, (M, N), ROWS, dropout=0.3 if with_mask else 0.0)
    # a layer whose backward treats part of the map as a constant (DoRA's detached norm) says
    # so with finite_difference_context(): inside it, the forward holds that part fixed
    for pname, err in gradient_errors(layer, x, G, mask).items():
        assert err < 1e-6, (pname, err)


@pytest.mark.parametrize("name,extra", cases())
def test_frozen_base_gets_no_gradient_and_float32_stays_float32(xp, name, extra):
    layer, _, _ = make(xp, name, extra, dtype="float32")
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
        make(xp, name, {}, r=6)


@pytest.mark.parametrize("name", lr.adapters.available())
def test_bad_inputs_raise(xp, name):
    layer, _, _ = make(xp, name, {})
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
    with pytest.raises(ValueError, match="unknown adapter variant 'nonesuch'.*registered"):
        lr.adapters.config("nonesuch")
    with pytest.raises(ValueError, match="^init must be one of"):
        lr.adapters.config("lora", init="xavier")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_1", "olora", "milora"])
def test_non_finite_weight_for_svd_init_raises(xp, init):
    W0 = np.ones((M, N))
    W0[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        lr.adapters.AdaptedLinear(xp.asarray(W0), None, lr.adapters.config("lora", r=2, init=init))


def test_kaiming_init_has_zero_dA_on_the_first_step(xp):
    layer, _, _ = make(xp, "lora", {})
    x = xp.asarray(np.random.default_rng(0).standard_normal((ROWS, N)))
    loss_and_grads(layer, x, xp.ones((ROWS, M)))
    assert float(abs(layer.lora_A.grad).max()) == 0.0
    assert float(abs(layer.lora_B.grad).max()) > 0.0


@pytest.mark.parametrize("name,extra", cases())
def test_save_then_load_gives_the_same_adapter(xp, name, extra, tmp_path):
    """lowrank's adapter files: a perturbed adapter saved, then loaded into a freshly injected
    model of the same config and seed, gives the same parameters and the same outputs."""
    cfg = lr.adapters.config(name, **{"r": R, "alpha": 3.0, **extra})
    models = [GPT(TINY, seed=0, dtype="float64", xp=xp) for _ in range(3)]   # saved, loaded, fresh
    for model in models:
        lr.adapters.inject(model, cfg, ["q", "fc1"], seed=3)
    perturb(models[0], xp, scale=0.1)
    checkpoint.save_adapter(models[0], tmp_path)
    checkpoint.load_adapter(models[1], tmp_path)
    saved, loaded = (dict(m.named_parameters()) for m in models[:2])
    for pname, p in saved.items():
        assert np.array_equal(backend.to_numpy(p.data), backend.to_numpy(loaded[pname].data)), \
            pname
    idx = xp.asarray(np.arange(8).reshape(2, 4) % TINY.vocab_size)
    y0, y1, y_fresh = (backend.to_numpy(m.eval().forward(idx)[0]) for m in models)
    assert np.array_equal(y0, y1)
    assert not np.allclose(y0, y_fresh)   # the trained adapter is what the file carried


def test_dora_and_rosa_take_the_multi_adapter_fallback():
    """DoRA's map is not the base plus a correction; RoSA keeps the fallback it always had."""
    assert sorted(set(lr.adapters.available()) - DELTA_PATH) == ["dora", "rosa"]


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout-mask"])
@pytest.mark.parametrize("name,extra", cases(delta_path_only=True))
def test_delta_path_is_the_map_minus_the_base_product(xp, name, extra, with_mask):
    """A variant declaring ``has_delta_path()``: ``delta_forward``/``delta_backward`` are its
    forward/backward minus ``x W0ᵀ + b0`` and ``G W0``, with the same parameter gradients."""
    layer, _, _ = make(xp, name, extra, dropout=0.3 if with_mask else 0.0)
    perturb(layer, xp)
    x, G, mask = problem(xp, (M, N), ROWS, dropout=0.3 if with_mask else 0.0)
    _, dx = loss_and_grads(layer, x, G, mask)
    y, _ = layer.forward(x, dropout_mask=mask)
    grads = {n: p.grad.copy() for n, p in layer.named_parameters(trainable_only=True)}
    layer.zero_grad()
    delta, cache = layer.delta_forward(x, mask)
    dx_delta = layer.delta_backward(G, cache)
    W0, b0 = layer.weight.data, layer.bias.data
    assert rel_err(y, x @ W0.T + b0 + delta) < 1e-13
    assert rel_err(dx, G @ W0 + dx_delta) < 1e-13
    for pname, p in layer.named_parameters(trainable_only=True):
        if pname != "bias":   # the base bias is the caller's (MultiAdapterLinear)
            assert rel_err(p.grad, grads[pname]) < 1e-13, pname


@pytest.mark.parametrize("name,extra", cases())
def test_multi_adapter_layer_equals_each_adapter_alone(xp, name, extra):
    """Two adapters of the variant over one frozen base: each group of rows gets exactly its
    adapter's outputs, input gradients and parameter gradients (fast path or fallback)."""
    alone = [make(xp, name, extra, seed=k, base_seed=0)[0] for k in (0, 1)]
    W0, b0 = make(xp, name, extra)[1:]
    multi = MultiAdapterLinear(W0, b0, {k: make(xp, name, extra, seed=k, base_seed=0)[0]
                                        for k in (0, 1)})
    for k, a in enumerate(alone):
        perturb(a, xp, seed=10 + k)
        perturb(multi.adapters[k], xp, seed=10 + k)
    fast = alone[0].has_delta_path() and bool((alone[0].weight.data == W0).all())
    assert multi.shares_base(0) == multi.shares_base(1) == fast
    x, G, _ = problem(xp, (M, N), 2 * ROWS)
    rows = [slice(0, ROWS), slice(ROWS, 2 * ROWS)]
    multi.groups = [(0, rows[0]), (1, rows[1])]
    multi.zero_grad()
    y, cache = multi.forward(x)
    dx = multi.backward(G, cache)
    for k, a in enumerate(alone):
        _, dx_k = loss_and_grads(a, x[rows[k]], G[rows[k]])
        assert rel_err(y[rows[k]], a.forward(x[rows[k]])[0]) < 1e-13
        assert rel_err(dx[rows[k]], dx_k) < 1e-13
        got = dict(multi.adapters[k].named_parameters(trainable_only=True))
        for pname, p in a.named_parameters(trainable_only=True):
            assert rel_err(got[pname].grad, p.grad) < 1e-13, (k, pname)


@pytest.mark.parametrize("name,extra", cases())
def test_drawn_dropout_equals_the_same_mask_given(xp, name, extra):
    """A layer drawing its own dropout (on NumPy the mask kept as one byte an element, the
    dropped input formed again in the backward) gives the bits of a twin given that mask."""
    drawn, _, _ = make(xp, name, extra, dropout=0.3)
    given, _, _ = make(xp, name, extra, dropout=0.3)
    x, G, _ = problem(xp, (M, N), 64)
    drawn.train()
    y, cache = drawn.forward(x)
    mask = getattr(cache, "mask", None)
    assert mask is not None and mask.compact == (backend.backend_of(x) == "numpy")
    if mask.compact and hasattr(cache, "_x2"):
        assert cache._x2 is None                     # no float copy of the dropped input kept
    dx = drawn.backward(G, cache)
    y_given, cache_given = given.forward(x, dropout_mask=mask.multiplier(x.dtype))
    dx_given = given.backward(G, cache_given)
    for got, want in [(y, y_given), (dx, dx_given)] + [
            (p.grad, q.grad) for p, q in zip(drawn.parameters(), given.parameters())
            if p.trainable and (p.grad is not None or q.grad is not None)]:
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
