"""LoKr beyond the contract battery (docs/variants.md#lokr): PEFT's factorisation of m and n,
its factored/whole choice per side, and finite differences at shapes where every layout
occurs (decompose_both, decompose_factor), with and without dropout."""
import numpy as np
import pytest

from lowrank.adapters.lokr import factorization

from tests.helpers.common import error_log, gradient_errors, make_layer, perturb, problem

ERRORS, _report_errors = error_log("lokr: backward vs central differences, float64")


@pytest.mark.parametrize("dim,factor,expected", [(256, -1, (16, 16)), (128, -1, (8, 16)),
                                                 (127, -1, (1, 127)), (128, 4, (4, 32)),
                                                 (24, -1, (4, 6)), (30, 3, (3, 10)),
                                                 (12, 5, (3, 4))])
def test_factorization_is_peft_s(dim, factor, expected):
    assert factorization(dim, factor) == expected


# (shape, fields, the adapter parameters that layout creates)
LAYOUTS = [
    ((24, 16), dict(r=2), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ((24, 16), dict(r=4), {"lokr_w1", "lokr_w2"}),
    ((24, 16), dict(r=1, decompose_both=True),
     {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    ((24, 16), dict(r=2, decompose_factor=2), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ((12, 18), dict(r=1, decompose_both=True, init_weights="lycoris"),
     {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    ((12, 18), dict(r=2, decompose_both=True), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("shape,fields,names", LAYOUTS)
def test_layouts_and_their_gradients(xp, shape, fields, names, dropout):
    layer, _, _ = make_layer(xp, "lokr", shape, alpha=3.0, dropout=dropout, **fields)
    assert {n for n, _ in layer.named_parameters(trainable_only=True)} == names
    out_l, out_k = layer.out_split
    in_m, in_n = layer.in_split
    assert out_l * out_k == shape[0] and in_m * in_n == shape[1]
    assert not np.any(layer.delta_weight())
    perturb(layer, xp)
    x, G, mask = problem(xp, shape, (2, 3), dropout=dropout)
    for name, err in gradient_errors(layer, x, G, mask).items():
        ERRORS.check(f"{shape} {fields} p={dropout} {name}", err)
