"""LoHa beyond the contract battery (docs/variants.md#loha): the Hadamard product reaches
rank r² (more than a LoRA of the same parameter count), and the gradients at a larger shape."""
import numpy as np
import pytest

from lowrank import backend

from tests.helpers.common import error_log, gradient_errors, make_layer, perturb, problem

ERRORS, _report_errors = error_log("loha: backward vs central differences, float64")


def test_delta_reaches_rank_r_squared(xp):
    layer, _, _ = make_layer(xp, "loha", (20, 16), r=3)
    assert not np.any(backend.to_numpy(layer.delta_weight()))    # PEFT's init: w2_b = 0
    perturb(layer, xp)
    assert np.linalg.matrix_rank(backend.to_numpy(layer.delta_weight())) == 9


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("r", [1, 4])
def test_gradients_at_a_larger_shape(xp, r, dropout):
    layer, _, _ = make_layer(xp, "loha", (12, 9), r=r, alpha=5.0, dropout=dropout)
    perturb(layer, xp)
    x, G, mask = problem(xp, (12, 9), (2, 3), dropout=dropout)
    for name, err in gradient_errors(layer, x, G, mask).items():
        ERRORS.check(f"r={r} p={dropout} {name}", err)
