"""VeRA beyond the contract battery (docs/variants.md#vera): gradients at a larger shape, one
projection pair shared by every injected layer and redrawn from the key on load."""
import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.formats import checkpoint
from lowrank.models import GPT, GPTConfig

from tests.helpers.common import error_log, gradient_errors, make_layer, perturb, problem

ERRORS, _report_errors = error_log("vera: backward vs central differences, float64")
TINY = GPTConfig(vocab_size=32, context=4, n_layer=2, n_head=2, d_model=8)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_at_a_larger_shape(xp, dropout):
    layer, _, _ = make_layer(xp, "vera", (12, 9), r=4, dropout=dropout)
    perturb(layer, xp)
    x, G, mask = problem(xp, (12, 9), (2, 3), dropout=dropout)
    for name, err in gradient_errors(layer, x, G, mask).items():
        ERRORS.check(f"p={dropout} {name}", err)


def test_only_the_scaling_vectors_train_and_projections_are_frozen_arrays(xp):
    layer, _, _ = make_layer(xp, "vera", (12, 9), r=4)
    assert [n for n, _ in layer.named_parameters(trainable_only=True)] == \
        ["vera_lambda_d", "vera_lambda_b"]
    assert float(abs(layer.vera_lambda_d.data - 0.1).max()) == 0.0
    assert layer.vera_A.shape == (4, 9) and layer.vera_B.shape == (12, 4)


def test_inject_shares_one_pair_and_load_redraws_it(xp, tmp_path):
    cfg = lr.adapters.config("vera", r=2, projection_prng_key=3)
    models = [GPT(TINY, seed=0, dtype="float64", xp=xp) for _ in range(2)]
    for model in models:
        lr.adapters.inject(model, cfg, ["q", "fc1", "fc2"])
    layers = [m for _, m in lr.adapters.adapted_modules(models[0])]
    shape = (max(m.out_features for m in layers), max(m.in_features for m in layers))
    full_A = layers[0].shared_projections()[0]
    for m in layers:
        assert m.projection_shape == shape
        assert np.array_equal(backend.to_numpy(m.vera_A),
                              backend.to_numpy(full_A)[:, :m.in_features])
    perturb(models[0], xp, scale=0.1)
    checkpoint.save_adapter(models[0], tmp_path)
    saved = checkpoint.read_adapter_config(tmp_path)["modules"]
    assert all("vera_A" not in k for m in saved.values() for k in m["params"])
    checkpoint.load_adapter(models[1], tmp_path)
    idx = xp.asarray(np.arange(8).reshape(2, 4) % TINY.vocab_size)
    y0, y1 = (backend.to_numpy(m.eval().forward(idx)[0]) for m in models)
    assert np.array_equal(y0, y1)
    other = GPT(TINY, seed=0, dtype="float64", xp=xp)   # another key: other projections
    lr.adapters.inject(other, lr.adapters.config("vera", r=2, projection_prng_key=4),
                       ["q", "fc1", "fc2"])
    with pytest.raises(ValueError, match="projection_prng_key=3"):
        checkpoint.load_adapter(other, tmp_path)


def test_several_vera_adapters_over_one_base_each_share_their_pair(xp):
    from lowrank.multi.modules import inject_multi, multi_modules
    model = GPT(TINY, seed=0, dtype="float64", xp=xp)
    specs = [(lr.adapters.config("vera", r=2, projection_prng_key=k), ["q", "fc1"], 0)
             for k in (1, 2)]
    inject_multi(model, specs)
    for k, key in enumerate((1, 2)):
        layers = [m.adapters[k] for _, m in multi_modules(model)]
        A, B = layers[0].shared_projections()
        assert all(lay.shared_projections()[0] is A for lay in layers)
        assert layers[0].projection_shape == (max(lay.out_features for lay in layers),
                                              max(lay.in_features for lay in layers))
        assert layers[0].config.projection_prng_key == key
