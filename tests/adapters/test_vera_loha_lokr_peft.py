"""VeRA, LoHa and LoKr against PEFT (docs/variants.md#vera, #loha, #lokr), float32, rel. < 1e-5.

Our adapter arrays (moved off their init, so no gradient is trivially zero) are copied into
PEFT's parameters of the same names; outputs, input gradients, every parameter gradient, ΔW
and the merged weight must agree. VeRA's frozen projections are not copied: they must already
be PEFT's, drawn from the same key (bit-equal), including the sharing of one pair of the
largest shape over several layers. Run with ``-s`` to see the largest error of each quantity.
"""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import lowrank as lr  # noqa: E402
from lowrank import backend  # noqa: E402
from lowrank.nn.layers import Linear  # noqa: E402
from lowrank.nn.module import Module  # noqa: E402
from reference import finite_diff, peft_variants  # noqa: E402

from tests.helpers.common import error_log  # noqa: E402

M, N_IN, ROWS, P_DROP = 24, 16, 10, 0.25
ERRORS, _report_errors = error_log("vera / loha / lokr vs PEFT, float32")

# (variant, our config fields, PEFT config fields)
CASES = [
    ("vera", dict(r=4), dict(r=4)),
    ("vera", dict(r=4, d_initial=0.3, projection_prng_key=5),
     dict(r=4, d_initial=0.3, projection_prng_key=5)),
    ("loha", dict(r=4, alpha=8.0), dict(r=4, alpha=8)),
    ("loha", dict(r=2, alpha=3.0), dict(r=2, alpha=3)),
    ("lokr", dict(r=2, alpha=4.0), dict(r=2, alpha=4)),                 # W2 factored
    ("lokr", dict(r=4, alpha=4.0), dict(r=4, alpha=4)),                 # W2 whole
    ("lokr", dict(r=1, alpha=2.0, decompose_both=True), dict(r=1, alpha=2, decompose_both=True)),
    ("lokr", dict(r=2, alpha=2.0, decompose_factor=2), dict(r=2, alpha=2, decompose_factor=2)),
    ("lokr", dict(r=2, init_weights="lycoris"), dict(r=2, alpha=8, init_weights="lycoris")),
]


def problem(seed=0):
    rng = np.random.default_rng(300 + seed)
    W0 = rng.standard_normal((M, N_IN)) / math.sqrt(N_IN)
    b0 = rng.standard_normal(M)
    x = rng.standard_normal((ROWS, N_IN))
    G = rng.standard_normal((ROWS, M))
    mask = (rng.random(x.shape) >= P_DROP) / (1.0 - P_DROP)
    return W0, b0, x, G, mask


def check(label, ours, ref):
    ERRORS.check(label, finite_diff.rel_error(backend.to_numpy(ours), ref), 1e-5)


def _ids(case):
    return f"{case[0]}[{','.join(f'{k}={v}' for k, v in case[1].items())}]"


# PEFT's LoHa and LoKr have no input dropout (rank/module dropout only): VeRA's runs both ways
RUNS = [pytest.param(*case, with_mask, id=f"{_ids(case)}-{'mask' if with_mask else 'no-dropout'}")
        for case in CASES for with_mask in ((False, True) if case[0] == "vera" else (False,))]


@pytest.mark.parametrize("variant,ours,theirs,with_mask", RUNS)
def test_outputs_gradients_and_delta_match_peft(variant, ours, theirs, with_mask):
    W0, b0, x, G, mask = problem()
    dropout = P_DROP if with_mask else 0.0
    cfg = lr.adapters.config(variant, **ours, dropout=dropout)
    layer = lr.adapters.AdaptedLinear(np.asarray(W0, np.float32), np.asarray(b0, np.float32), cfg)
    peft_fields = dict(theirs, vera_dropout=dropout) if variant == "vera" else theirs
    _, (peft_layer,) = peft_variants.build(variant, [W0], [b0], **peft_fields)
    # PEFT's init, in the parameters it creates and the values it gives the deterministic ones
    peft_init = peft_variants.adapter_state(peft_layer)
    params = dict(layer.named_parameters(trainable_only=True))
    assert set(peft_init) == set(params), (sorted(peft_init), sorted(params))
    for name, p in params.items():
        assert peft_init[name].shape == p.shape, name
        if not peft_init[name].any():   # PEFT's zero factor is ours: ΔW = 0 at init
            assert not p.data.any(), name
    if variant == "vera":
        assert np.array_equal(layer.vera_lambda_d.data, peft_init["vera_lambda_d"])
        assert np.array_equal(layer.vera_A, peft_layer.vera_A["default"].numpy())
        assert np.array_equal(layer.vera_B, peft_layer.vera_B["default"].numpy())
    rng = np.random.default_rng(1)
    for p in params.values():
        p.data = (p.data + 0.4 * rng.standard_normal(p.shape)).astype(np.float32)
    ref = peft_variants.forward_backward(peft_layer, {n: p.data for n, p in params.items()},
                                         x, G, mask if with_mask else None)
    layer.zero_grad()
    y, cache = layer.forward(x.astype(np.float32),
                             dropout_mask=mask.astype(np.float32) if with_mask else None)
    dx = layer.backward(G.astype(np.float32), cache)
    tag = _ids((variant, ours))
    check(f"{tag} y", y, ref["y"])
    check(f"{tag} dx", dx, ref["dx"])
    for name, p in params.items():
        check(f"{tag} d{name}", p.grad, ref["grads"][name])
    check(f"{tag} delta_weight", layer.delta_weight(), ref["delta"])
    layer.merge()
    check(f"{tag} merged", layer.weight.data, ref["merged"])
    assert ref["base_grad"] is None and layer.weight.grad is None


class _TwoLinears(Module):
    def __init__(self, weights):
        self.l0 = Linear.from_arrays(weights[0])
        self.l1 = Linear.from_arrays(weights[1])


@pytest.mark.parametrize("key", [0, 11])
def test_vera_shares_peft_projection_pair_over_layers(key):
    """Two layers of different shapes: PEFT draws one pair of the largest (m, n) and slices it;
    inject gives every layer the same slices, bit-equal to PEFT's."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((24, 16)), rng.standard_normal((10, 30))]
    _, peft_layers = peft_variants.build("vera", weights, [None, None], r=4,
                                         projection_prng_key=key)
    model = _TwoLinears([w.astype(np.float32) for w in weights])
    lr.adapters.inject(model, lr.adapters.config("vera", r=4, projection_prng_key=key),
                       ["l0", "l1"])
    for ours, theirs in zip((model.l0, model.l1), peft_layers):
        sliced_A = theirs.vera_A["default"][:, :theirs.in_features].numpy()
        sliced_B = theirs.vera_B["default"][:theirs.out_features].numpy()
        assert ours.projection_shape == (24, 30)
        assert np.array_equal(ours.vera_A, sliced_A) and np.array_equal(ours.vera_B, sliced_B)
    assert np.shares_memory(model.l0.vera_A, model.l1.vera_A)   # one pair, held once
