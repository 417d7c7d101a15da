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
from lowrank.nn.optim import AdamW, lr_at
from lowrank.parallel import SingleProcess
from lowrank.training.trainer import TrainConfig
from reference import official

from tests.helpers.common import to_host


def _model_of(*layers):
    named = [(f"layer{i}", m) for i, m in enumerate(layers)]
    return SimpleNamespace(named_modules=lambda: iter(named))


def _trainer(steps, lr_=0.05, warmup=0, min_lr=None, optimizer=None, hooks=()):
    cfg = TrainConfig(steps=steps, lr=lr_, min_lr=lr_ if min_lr is None else min_lr,
                      warmup=warmup, grad_clip=0.0)
    trainer = SimpleNamespace(config=cfg, step=0, optimizer=optimizer, comm=SingleProcess())

    def schedule(step):
        rate = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr)
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
    assert got[K] == 0.0 and (warmup == 0 or got[0] == 0.0)   # each restart's step i = 0


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


@pytest.mark.parametrize("mode,lora_lr", [("mean_squared", None), ("mean", None),
                                          ("mean_squared", 0.15)])
def test_rosa_restart_run_matches_the_official_two_runs(mode, lora_lr):
    """warm-up 2 + collection 2 steps, then the restart: lowrank's one run equals the official
    mask run followed by a fresh run with the mask loaded, for 5 steps after the restart
    (with ``lora_lr``: A and B in their own group at 3x the lr)."""
    steps, warmup, collect = 9, 2, 2
    layer = _rosa_layer(warmup_steps=warmup, collect_steps=collect, grad_acc_mode=mode,
                        lora_lr=lora_lr)
    A0, B0 = to_host(layer.lora_A.data).copy(), to_host(layer.lora_B.data).copy()
    layer.initial_lora = (layer.lora_A.data.copy(), layer.lora_B.data.copy())   # B moved off 0
    rng = np.random.default_rng(4)
    batches = [(rng.standard_normal((7, 5)), rng.standard_normal((7, 6))) for _ in range(steps)]
    hook = RosaHook(RosaLinear.layers_of(_model_of(layer)))
    trainer = _trainer(steps, lr_=0.05, warmup=2, min_lr=0.01, hooks=[hook])
    hook.bind(trainer)
    opt = AdamW([(n, p) for n, p in layer.named_parameters(trainable_only=True)
                 if not hook.owns(n, p)], lr=0.05, weight_decay=0.0)
    trainer.optimizer = opt
    assert len(opt.params) == (1 if lora_lr else 3)
    got = []
    for t, (x, G) in enumerate(batches):
        trainer.step = t
        layer.zero_grad()
        _, cache = layer.forward(x)
        layer.backward(G, cache)
        hook.extra_loss(trainer)
        opt.step(trainer.lr_at(t))
        hook.after_step(trainer)
        if t >= warmup + collect:
            got.append((to_host(layer.lora_A.data).copy(), to_host(layer.lora_B.data).copy(),
                        _dense_S(layer)))
    want = official.rosa_official_run(layer.weight.data, A0, B0, layer.scaling, batches,
                                      density=0.3, warmup=warmup, collect=collect, lr=0.05,
                                      min_lr=0.01, lr_warmup=2, steps=steps, grad_acc_mode=mode,
                                      lora_lr=lora_lr)
    assert hook.restarted_at == warmup + collect
    assert len(got) == len(want) == steps - warmup - collect
    for (A, B, S), (wA, wB, wS) in zip(got, want):
        np.testing.assert_allclose(A, wA, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(B, wB, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(S, wS, rtol=1e-9, atol=1e-12)
    assert np.count_nonzero(got[-1][2]) == layer.nnz


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


# --- IncreLoRA: reserves, growth, per-triplet AdamW, orthogonality --------------------------------
@pytest.mark.parametrize("advance", [True, False], ids=["advance-learning", "no-advance"])
def test_increlora_steps_match_the_official_allocator(advance):
    """Three layers, budget 7 from 3: growths at g = 2 and g = 4 (two modules + 1 each); every
    A, E, B and ranknum after each of 7 steps equals the official SVDLinear + RankAllocator +
    torch-AdamW groups + compute_orth_regu, transcribed in reference/official.py."""
    from lowrank.adapters._increlora_hook import IncreLoraHook
    rng = np.random.default_rng(8)
    shapes = [(6, 5), (5, 7), (4, 4)]
    cfg = lr.adapters.config("increlora", r=2, alpha=3.0, init_r=1, add_r=1, top_h=2,
                             init_warmup=1, incre_interval=2, total_budget=7,
                             advance_learning=advance)
    layers, naive = [], []
    for i, (m, n) in enumerate(shapes):
        layer = lr.adapters.AdaptedLinear(rng.standard_normal((m, n)), None, cfg, seed=i)
        layer.lora_E.data[:] = 0.3                       # off zero, so A gets gradients too
        stream = np.random.Generator(np.random.PCG64())
        stream.bit_generator.state = copy.deepcopy(layer.host_rng_state())
        naive.append(official.NaiveIncreLoraLayer(layer.weight.data, layer.lora_A.data,
                                                  layer.lora_E.data, layer.lora_B.data,
                                                  3.0, stream))
        layers.append(layer)
    hook = IncreLoraHook([(f"l{i}", m) for i, m in enumerate(layers)])
    trainer = _trainer(7, lr_=0.05, warmup=1, min_lr=0.01, optimizer=AdamW([], lr=0.05),
                       hooks=[hook])
    alloc = official.NaiveIncreLoraAllocator(
        naive, target_rank=7, add_r=1, top_h=2, init_warmup=1, incre_interval=2, beta1=0.85,
        beta2=0.85, advance_learn=advance, base_lr=0.05, reg_orth_coef=0.1)
    for g in range(7):
        trainer.step = g
        batches = [(rng.standard_normal((5, m.in_features)),
                    rng.standard_normal((5, m.out_features))) for m in layers]
        for layer, (x, G) in zip(layers, batches):
            layer.zero_grad()
            _, cache = layer.forward(x)
            layer.backward(G, cache)
        hook.extra_loss(trainer)
        hook.after_step(trainer)
        alloc.step(g, batches, trainer.lr_at(g))
        for i, (layer, ref) in enumerate(zip(layers, naive)):
            assert layer.ranknum == int(ref.ranknum), (g, i)
            for got, want in ((layer.lora_A.data, np.concatenate(ref.A, 0)),
                              (layer.lora_E.data, np.concatenate(ref.E, 0).reshape(-1)),
                              (layer.lora_B.data, np.concatenate(ref.B, 1))):
                np.testing.assert_allclose(to_host(got), want, rtol=1e-9, atol=1e-13,
                                           err_msg=f"step {g}, layer {i}")
    assert sum(m.ranknum for m in layers) == 7 and [h[0] for h in hook.history] == [2, 2, 4, 4]
    assert all(float(abs(m.lora_E.data[m.ranknum:]).max()) == 0.0 for m in layers)
