"""The ``svd`` variant (docs/variants.md#svd): split init, trainable subsets of {U, σ, V},
gradients, config.

Run with ``-s`` to see the largest finite-difference relative error of each factor.
"""
import functools
import itertools
import json

import numpy as np
import pytest

import lowrank as lr
from lowrank.nn.decompose import svd_split

from tests.helpers.common import error_log, gradient_errors, make_layer, perturb, problem, rel_err, to_host

M, N, R, ROWS = 7, 5, 3, 6
SUBSETS = [s for k in (1, 2, 3) for s in itertools.combinations(("U", "S", "V"), k)]
PARAM = {"U": "svd_U", "S": "svd_S", "V": "svd_V"}
ERRORS, _report_errors = error_log("svd")
make = functools.partial(make_layer, variant="svd", shape=(M, N), r=R, alpha=3.0)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout-mask"])
@pytest.mark.parametrize("train", SUBSETS, ids=["".join(s) for s in SUBSETS])
def test_gradients_match_finite_differences_for_every_trainable_subset(xp, train, with_mask):
    layer, _, _ = make(xp, train=train, dropout=0.3 if with_mask else 0.0)
    perturb(layer, xp, seed=3, scale=0.3, frozen=True)   # off the init, frozen factors too
    x, G, mask = problem(xp, (M, N), ROWS, dropout=0.3 if with_mask else 0.0)
    errors = gradient_errors(layer, x, G, mask)
    assert set(errors) == {PARAM[f] for f in train} | {"x"}
    for f in ("U", "S", "V"):
        p = getattr(layer, PARAM[f])
        if f not in train:
            assert p.grad is None and not p.trainable
    for name, err in errors.items():
        ERRORS.check(f"{name} {'mask' if with_mask else 'plain'}", err)
    assert layer.weight.grad is None


def test_seed_method_trains_U_and_sigma_only(xp):
    layer, _, _ = make(xp, train=("U", "S"))
    assert layer.config.train == ("U", "S")
    assert [n for n, _ in layer.named_parameters(trainable_only=True)] == ["svd_U", "svd_S"]
    x = xp.asarray(np.random.default_rng(1).standard_normal((ROWS, N)))
    layer.zero_grad()
    y, cache = layer.forward(x)
    layer.backward(xp.ones_like(y), cache)
    assert layer.svd_V.grad is None and float(abs(layer.svd_U.grad).max()) > 0


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_init_splits_W0_and_output_equals_base(xp, method):
    layer, W0, b0 = make(xp, method=method, n_iter=2)
    U, S, V = (to_host(p.data) for p in (layer.svd_U, layer.svd_S, layer.svd_V))
    W_h = to_host(layer.weight.data)
    assert U.shape == (M, R) and S.shape == (R,) and V.shape == (N, R)
    np.testing.assert_allclose(W_h + (U * S) @ V.T, to_host(W0), atol=1e-13)
    np.testing.assert_allclose(U.T @ U, np.eye(R), atol=1e-12)
    np.testing.assert_allclose(V.T @ V, np.eye(R), atol=1e-12)
    # the randomized sketch of a 7x5 matrix with oversample 10 spans everything: same top r
    np.testing.assert_allclose(S, np.linalg.svd(to_host(W0), compute_uv=False)[:R], rtol=1e-10)
    x = xp.asarray(np.random.default_rng(2).standard_normal((2, ROWS, N)))
    y, _ = layer.eval().forward(x)
    assert rel_err(y, x @ W0.T + b0) < 1e-13
    assert rel_err(layer.delta_weight(), (U * S) @ V.T) < 1e-15


def test_randomized_init_is_deterministic_and_near_optimal(xp):
    rng = np.random.default_rng(9)
    m, n, r = 40, 30, 4
    Q1, _ = np.linalg.qr(rng.standard_normal((m, n)))
    Q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    W0 = (Q1 * 0.7 ** np.arange(n)) @ Q2.T
    cfg = lr.adapters.config("svd", r=r, method="randomized", oversample=2, n_iter=1)
    a = lr.adapters.AdaptedLinear(xp.asarray(W0), None, cfg, seed=5)
    b = lr.adapters.AdaptedLinear(xp.asarray(W0), None, cfg, seed=5)
    assert rel_err(a.weight.data, b.weight.data) == 0.0
    exact = svd_split(xp.asarray(W0), r)
    assert rel_err(a.svd_S.data, exact.S) < 1e-3
    np.testing.assert_allclose(to_host(a.weight.data) + to_host(a.delta_weight()), W0, atol=1e-13)
    # residual within a small factor of Eckart–Young's optimum
    assert np.linalg.norm(to_host(a.weight.data)) < 1.01 * np.linalg.norm(to_host(exact.residual))


def test_forward_with_dropout_and_merge_round_trip(xp):
    layer, W0, b0 = make(xp, dropout=0.5)
    rng = np.random.default_rng(4)
    for p in (layer.svd_U, layer.svd_S, layer.svd_V):
        p.data += xp.asarray(0.3 * rng.standard_normal(p.shape))
    x = xp.asarray(rng.standard_normal((ROWS, N)))
    mask = xp.asarray((rng.random((ROWS, N)) > 0.5) * 2.0)
    y, _ = layer.forward(x, dropout_mask=mask)
    U, S, V = layer.svd_U.data, layer.svd_S.data, layer.svd_V.data
    expect = x @ layer.weight.data.T + b0 + (((x * mask) @ V) * S) @ U.T
    assert rel_err(y, expect) < 1e-14
    base = layer.weight.data.copy()
    y_eval, _ = layer.eval().forward(x)
    layer.merge()
    assert rel_err(layer.forward(x)[0], y_eval) < 1e-13
    layer.unmerge()
    assert rel_err(layer.weight.data, base) < 1e-13


def test_train_field_forms_and_json_round_trip():
    assert lr.adapters.config("svd").train == ("U", "S", "V")
    assert lr.adapters.config("svd", train=["S", "U"]).train == ("U", "S")
    assert lr.adapters.config("svd", train="U,S").train == ("U", "S")   # CLI: --train U,S
    assert lr.adapters.config("svd", train=("V",)).train == ("V",)
    cfg = lr.adapters.config("svd", r=4, train=("U", "S"), method="randomized", n_iter=1)
    again = lr.adapters.config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("field,value", [("train", ()), ("train", []), ("train", ""),
                                         ("train", ("U", "X")), ("train", ("sigma",)),
                                         ("train", 3), ("method", "qr"), ("oversample", -1),
                                         ("oversample", 1.5), ("n_iter", -1), ("n_iter", True)])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} "):
        lr.adapters.config("svd", **{field: value})


def test_bad_rank_and_weights_raise(xp):
    with pytest.raises(ValueError, match=r"^r must be an integer in 1\.\.min\(m, n\) = 1\.\.5"):
        make(xp, r=6)
    W0 = np.ones((M, N))
    W0[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        make(xp, W0=W0)
