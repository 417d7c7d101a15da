"""AdamW's per-parameter API for step hooks (docs/training.md#adamw): moments, step counts and
a fresh start, addressed by the Parameter itself."""
import numpy as np

from lowrank.nn.module import Parameter
from lowrank.nn.optim import AdamW


def _stepped(steps=2):
    a, b = Parameter(np.ones((2, 3))), Parameter(np.ones(4))
    opt = AdamW([("a", a), ("b", b)], lr=0.1, weight_decay=0.0)
    for _ in range(steps):
        a.grad, b.grad = np.full((2, 3), 0.5), np.full(4, -1.0)
        opt.step()
    return opt, a, b


def test_moments_are_the_live_arrays_of_that_parameter():
    opt, a, b = _stepped()
    exp_avg, exp_avg_sq = opt.moments(a)
    assert exp_avg.shape == (2, 3) and np.all(exp_avg > 0) and np.all(exp_avg_sq > 0)
    assert np.all(opt.moments(b)[0] < 0)
    exp_avg *= 0.0                                   # in place: what ReLoRA's pruning relies on
    assert not opt.moments(a)[0].any()
    assert opt.step_of(a) == opt.step_of(b) == 2
    assert opt.name_of(b) == "b" and opt.name_of(Parameter(np.ones(4))) is None


def test_reset_state_restarts_one_parameter_only():
    opt, a, b = _stepped()
    assert opt.reset_state(a)
    assert opt.moments(a) is None and opt.step_of(a) == 0 and opt.step_of(b) == 2
    before = a.data.copy()
    a.grad, b.grad = np.full((2, 3), 0.5), np.full(4, -1.0)
    opt.step()
    # a fresh state's first step moves each entry by lr (bias-corrected m / √v = sign(g))
    np.testing.assert_allclose(before - a.data, 0.1, rtol=1e-6)
    assert opt.step_of(a) == 1 and opt.step_of(b) == 3
    assert not opt.reset_state(Parameter(np.ones(1)))   # not registered: nothing to reset
    assert opt.moments(Parameter(np.ones(1))) is None
