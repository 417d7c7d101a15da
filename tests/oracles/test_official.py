"""lowrank's defaults against the official code's update rules, step by step
(docs/variants.md: the three-column table of each variant names these tests).

The oracles are ``reference/official.py``: naive NumPy transcriptions of the authors' code
that share nothing with lowrank. Each test drives lowrank's layer and step hook the way the
Trainer does (backward → extra_loss → optimizer step → after_step) and compares every step.
"""
import copy
from types import SimpleNamespace

import numpy as np
import pytest

import lowrank as lr
from lowrank.adapters.relora import ReLoraHook
from lowrank.adapters.rosa import RosaHook, RosaLinear
from lowrank.adapters.sora import SoraHook
from lowrank.nn.optim import AdamW
from lowrank.nn.schedules import Schedule
from lowrank.parallel import SingleProcess
from lowrank.training.trainer import TrainConfig
from reference import official

from tests.helpers.common import to_host


def _model_of(*layers):
    named = [(f"layer{i}", m) for i, m in enumerate(layers)]
    return SimpleNamespace(named_modules=lambda: iter(named))


def _trainer(steps, lr_=0.05, warmup=0, min_lr=None, optimizer=None, hooks=(),
             schedule_name="lowrank_cosine", adamw="torch", model=None):
    """What a step hook reads of the Trainer, with its schedule and AdamW form."""
    cfg = TrainConfig(steps=steps, lr=lr_, min_lr=lr_ if min_lr is None else min_lr,
                      warmup=warmup, grad_clip=0.0, schedule=schedule_name, adamw=adamw)
    trainer = SimpleNamespace(config=cfg, step=0, optimizer=optimizer, comm=SingleProcess(),
                              schedule=Schedule(schedule_name, cfg.lr, cfg.warmup, cfg.steps,
                                                cfg.min_lr),
                              schedule_name=schedule_name, adamw_form=adamw, model=model,
                              dropout_states=lambda: {}, restart_streams=lambda states: None)

    def schedule(step):
        rate = trainer.schedule.lr_at(step)
        for hook in hooks:
            rate = hook.lr_at(trainer, step, rate)
        return rate
    trainer.lr_at = schedule
    return trainer


# --- SoRA: SparseAdamW's three masks and the L1 loss term ---------------------------------------
@pytest.mark.parametrize("loss_lambda", [0.0, 0.5], ids=["no-loss-term", "loss-term"])
def test_sora_gate_steps_match_sparse_adamw(loss_lambda):
    """Two SoRA layers (one gate count for the loss term), ξ = 0.2: the gates after each of 6
    steps equal SparseAdamW.step's (with compute_loss's λ·Σ|g|/#g gradient), and some
    entries land in ξ < |g| < 2ξ before the masks, where the soft threshold would differ."""
    rng = np.random.default_rng(0)
    layers = []
    for seed, (m, n, r) in enumerate([(7, 5, 3), (6, 4, 2)]):
        W0 = rng.standard_normal((m, n))
        cfg = lr.adapters.config("sora", r=r, alpha=2.0, sparse_lambda=0.2,
                                 loss_lambda=loss_lambda)
        layer = lr.adapters.AdaptedLinear(W0, None, cfg, seed=seed)
        layer.lora_B.data = 0.5 * rng.standard_normal((m, r))
        layers.append(layer)
    hook = SoraHook(_model_of(*layers))
    trainer = _trainer(6, lr_=0.3)
    gates = [to_host(m.lora_gate.data).copy() for m in layers]
    states = [{} for _ in layers]
    in_band = 0
    for t in range(6):
        trainer.step = t
        raw = []
        for layer in layers:
            layer.zero_grad()
            x = rng.standard_normal((9, layer.in_features))
            G = rng.standard_normal((9, layer.out_features))
            _, cache = layer.forward(x)
            layer.backward(G, cache)
            raw.append(to_host(layer.lora_gate.grad).copy())
        value = hook.extra_loss(trainer)
        want_value, extra = official.sora_loss_term(gates, loss_lambda)
        assert value == pytest.approx(want_value, rel=1e-12, abs=1e-15)
        hook.after_step(trainer)
        for i, layer in enumerate(layers):
            grad = raw[i] + extra[i]
            pre = official.sparse_adamw_step(gates[i].copy(), grad, copy.deepcopy(states[i]),
                                             0.3, 0.0)               # before the masks
            in_band += int(((np.abs(pre) > 0.2) & (np.abs(pre) < 0.4)).sum())
            official.sparse_adamw_step(gates[i], grad, states[i], 0.3, 0.2)
            got = to_host(layer.lora_gate.data)
            np.testing.assert_allclose(got, gates[i], rtol=1e-12, atol=1e-14)
            gates[i] = got.copy()        # continue from identical values
    assert in_band > 0   # entries with ξ < |g| < 2ξ met the masks (soft would keep them)


def test_sora_masks_zero_below_two_xi_and_soft_option_differs():
    """The issue's example, ξ = 0.1: g = 0.12 → 0 officially, 0.02 with threshold="soft"."""
    from lowrank.adapters.sora import masked_threshold, soft_threshold
    g = np.array([0.12, -0.15, 0.25, -0.05, 0.1, -0.3])
    ref = g.copy()
    ref[ref > 0.1] -= 0.1
    ref[ref < -0.1] += 0.1
    ref[abs(ref) < 0.1] = 0.0
    np.testing.assert_array_equal(masked_threshold(g, 0.1), ref)
    assert masked_threshold(g, 0.1)[0] == 0.0
    assert soft_threshold(g, 0.1)[0] == pytest.approx(0.02)


# --- ReLoRA: the official jagged schedule --------------------------------------------------------
@pytest.mark.parametrize("steps,warmup,K,W,rho", [(40, 5, 10, 3, 0.1), (24, 0, 8, 4, 0.25),
                                                 (30, 2, 6, 6, 1.0)])
def test_relora_schedule_matches_the_official_lambda(steps, warmup, K, W, rho):
    W0 = np.random.default_rng(0).standard_normal((4, 3))
    cfg = lr.adapters.config("relora", r=1, reset_interval=K, restart_warmup=W, min_lr_ratio=rho)
    hook = ReLoraHook(_model_of(lr.adapters.AdaptedLinear(W0, None, cfg, seed=0)))
    trainer = _trainer(steps, lr_=0.02, warmup=warmup, min_lr=0.002, hooks=[hook])
    got = [trainer.lr_at(t) for t in range(steps)]
    want = [0.02 * official.relora_lr_lambda(
        t, num_training_steps=steps, first_warmup_steps=warmup, restart_warmup_steps=W,
        restart_every=K, min_lr_ratio=rho) for t in range(steps)]
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    assert got[K] == 0.0 and got[0] == (0.0 if warmup else 0.02)   # no restart warm-up in
    # the first cycle (the current code): step 0 runs at the full rate without a warm-up


def test_relora_min_lr_ratio_defaults_to_the_trainers_ratio():
    W0 = np.random.default_rng(0).standard_normal((4, 3))
    cfg = lr.adapters.config("relora", r=1, reset_interval=5, restart_warmup=2)
    hook = ReLoraHook(_model_of(lr.adapters.AdaptedLinear(W0, None, cfg, seed=0)))
    trainer = _trainer(20, lr_=0.01, warmup=2, min_lr=0.001, hooks=[hook])
    want = [0.01 * official.relora_lr_lambda(
        t, num_training_steps=20, first_warmup_steps=2, restart_warmup_steps=2,
        restart_every=5, min_lr_ratio=0.1) for t in range(20)]
    np.testing.assert_allclose([trainer.lr_at(t) for t in range(20)], want, rtol=1e-14)


# --- RoSA: S on the undropped x, the mask, the restart ---------------------------------------------
def _dense_S(layer):
    S = np.zeros(layer.weight.shape)
    S.reshape(-1)[to_host(layer.rosa_indices.data).astype(np.int64)] = to_host(layer.rosa_values.data)
    return S


def _rosa_layer(**options):
    rng = np.random.default_rng(1)
    W0 = rng.standard_normal((6, 5))
    cfg = lr.adapters.config("rosa", r=2, alpha=3.0, density=0.3, **options)
    layer = lr.adapters.AdaptedLinear(W0, rng.standard_normal(6), cfg, seed=2)
    layer.lora_B.data = rng.standard_normal((6, 2))
    return layer


@pytest.mark.parametrize("sparse_input", ["x", "x_d"])
def test_rosa_forward_applies_S_to_the_undropped_x(sparse_input):
    layer = _rosa_layer(support="random", dropout=0.3, sparse_input=sparse_input)
    rng = np.random.default_rng(3)
    layer.rosa_values.data = rng.standard_normal(layer.nnz)
    x = rng.standard_normal((2, 4, 5))
    mask = (rng.random(x.shape) >= 0.3) / 0.7
    S = _dense_S(layer)
    y, _ = layer.forward(x, dropout_mask=mask)
    want = official.rosa_forward(x, layer.weight.data, layer.bias.data, layer.lora_A.data,
                                 layer.lora_B.data, layer.scaling, S, mask)
    if sparse_input == "x":
        np.testing.assert_allclose(to_host(y), want, rtol=1e-12, atol=1e-12)
    else:   # lowrank's former form: S on x_d, which the official layer does not compute
        assert np.abs(to_host(y) - want).max() > 1e-3


def test_rosa_mask_matches_the_official_collection():
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal((6, 5)) for _ in range(3)]
    for mode in ("mean_squared", "mean"):
        layer = _rosa_layer(grad_acc_mode=mode)
        for g in grads:
            layer.add_score(g.copy())
        layer.select_support()
        want = np.flatnonzero(official.rosa_mask(grads, 0.3, mode))
        np.testing.assert_array_equal(to_host(layer.rosa_indices.data), want)


