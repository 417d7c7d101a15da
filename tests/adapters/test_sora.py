"""SoRA (docs/variants.md#sora): gate gradients, the proximal step and its ξ schedules, pruning to
a plain LoRA, training through the Trainer hook, and exact resume of the gate's optimizer."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.formats import checkpoint
from lowrank.app import workflows as wf
from lowrank.adapters.lora import LoraLinear
from lowrank.adapters.sora import SoraHook, SoraLinear, lambda_at, prune_sora, soft_threshold
from lowrank.models import GPT, GPTConfig
from lowrank.training.trainer import Trainer, TrainConfig

from tests.helpers.common import FakeData, gradient_errors, make_layer, problem, rel_err, to_host

TINY = GPTConfig(vocab_size=64, context=8, n_layer=2, n_head=2, d_model=16)
M, N, R, ROWS = 7, 5, 3, 6


def make(xp, **options):
    """A SoRA layer (M, N), A and B moved off their init (B = 0 would make dA = dg = 0); the
    gate keeps its N(0, 1) draw."""
    layer = make_layer(xp, "sora", (M, N), **{"r": R, "alpha": 5.0, **options})[0]
    rng = np.random.default_rng(0)
    for p in (layer.lora_A, layer.lora_B):
        p.data += xp.asarray(0.3 * rng.standard_normal(p.shape), dtype=p.dtype)
    return layer


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout-mask"])
def test_gradients_match_finite_differences(xp, with_mask):
    layer = make(xp, dropout=0.25 if with_mask else 0.0)
    x, G, mask = problem(xp, (M, N), ROWS, seed=3, dropout=0.25 if with_mask else 0.0)
    errors = gradient_errors(layer, x, G, mask)
    assert set(errors) == {"lora_A", "lora_B", "lora_gate", "x"}
    assert max(errors.values()) < 1e-6, errors
    assert layer.weight.grad is None


def test_gate_init_is_standard_normal_and_output_starts_at_base(xp):
    W0 = xp.asarray(np.random.default_rng(0).standard_normal((64, 48)))
    layer = lr.adapters.AdaptedLinear(W0, None, lr.adapters.config("sora", r=32), seed=1)
    g = to_host(layer.lora_gate.data).copy()
    assert g.shape == (32,) and abs(g.mean()) < 0.5 and 0.6 < g.std() < 1.4
    assert float(abs(layer.delta_weight()).max()) == 0.0      # B = 0, as LoRA


def test_soft_threshold_math(xp):
    g = xp.asarray(np.array([-2.0, -0.3, 0.0, 0.2, 0.5, 1.5]))
    out = to_host(soft_threshold(g, 0.5))
    np.testing.assert_array_equal(out, [-1.5, 0.0, 0.0, 0.0, 0.0, 1.0])
    assert soft_threshold(g, 0.5).dtype == g.dtype


def _fake_trainer(layer, step=0, lr_=0.1, steps=10):
    cfg = TrainConfig(steps=steps, lr=lr_, min_lr=lr_, warmup=0)
    return SimpleNamespace(config=cfg, step=step, optimizer=None, lr_at=lambda step: lr_)


def test_gate_lr_follows_the_run_schedule_rescaled():
    cfg = lr.adapters.config("sora", gate_lr=0.5)
    trainer = SimpleNamespace(config=TrainConfig(steps=10, lr=0.1, min_lr=0.01, warmup=2), step=0,
                              lr_at=lambda step: 0.05)
    assert SoraHook.gate_lr(trainer, cfg) == pytest.approx(0.25)
    assert SoraHook.gate_lr(trainer, lr.adapters.config("sora")) == 0.05


def test_hook_sgd_step_then_proximal(xp):
    """The paper's proximal gradient step: threshold η·ξ (here 0.1 · 0.5)."""
    layer = make(xp, gate_optimizer="sgd", sparse_lambda=0.5, threshold="soft")
    model = SimpleNamespace(named_modules=lambda: iter([("layer", layer)]))
    hook = SoraHook(model)
    assert hook.owns("layer.lora_gate", layer.lora_gate)
    assert not hook.owns("layer.lora_A", layer.lora_A)
    g0 = to_host(layer.lora_gate.data).copy()
    grad = np.array([0.3, -2.0, 0.1])
    layer.lora_gate.grad = xp.asarray(grad)
    hook.after_step(_fake_trainer(layer, lr_=0.1))
    want = g0 - 0.1 * grad
    want = np.sign(want) * np.maximum(np.abs(want) - 0.1 * 0.5, 0.0)
    np.testing.assert_allclose(to_host(layer.lora_gate.data), want, rtol=0, atol=1e-15)


def test_hook_adam_step_matches_hf_adamw_then_proximal(xp):
    """The official SparseAdamW: HF AdamW (eps on √v, bias correction in the step size), with
    the soft threshold option."""
    layer = make(xp, sparse_lambda=0.01, threshold="soft")
    model = SimpleNamespace(named_modules=lambda: iter([("layer", layer)]))
    hook = SoraHook(model)
    g = to_host(layer.lora_gate.data).copy()
    m = v = np.zeros(R)
    rng = np.random.default_rng(5)
    for t in range(1, 4):
        grad = rng.standard_normal(R)
        layer.lora_gate.grad = xp.asarray(grad)
        hook.after_step(_fake_trainer(layer, step=t - 1, lr_=0.05))
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        g = g - 0.05 * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (np.sqrt(v) + 1e-6)
        g = np.sign(g) * np.maximum(np.abs(g) - 0.01, 0.0)
        np.testing.assert_allclose(to_host(layer.lora_gate.data), g, rtol=1e-13, atol=1e-15)


def test_lambda_schedules_follow_the_official_lists():
    cfg = lr.adapters.config
    const = cfg("sora", sparse_lambda=0.3)
    assert [lambda_at(const, t, 5) for t in range(5)] == [0.3] * 5
    lin = cfg("sora", sparse_lambda=0.1, lambda_schedule="linear", max_lambda=0.5)
    np.testing.assert_allclose([lambda_at(lin, t, 5) for t in range(7)],
                               list(np.linspace(0.1, 0.5, 5)) + [0.5, 0.5], rtol=1e-15)
    log = cfg("sora", sparse_lambda=0.1, lambda_schedule="log_linear", max_lambda=2.0,
              lambda_steps=4)
    official = np.log(np.linspace(np.exp(0.1), np.exp(2.0), 4))   # SparseAdamW's list
    np.testing.assert_allclose([lambda_at(log, t, 100) for t in range(6)],
                               list(official) + [2.0, 2.0], rtol=1e-14)
    down = cfg("sora", sparse_lambda=0.5, lambda_schedule="linear", max_lambda=0.0)
    assert lambda_at(down, 0, 3) == 0.5 and lambda_at(down, 2, 3) == 0.0


@pytest.mark.parametrize("field,value", [("sparse_lambda", -1.0), ("sparse_lambda", "big"),
                                         ("lambda_schedule", "cosine"), ("max_lambda", -0.1),
                                         ("lambda_steps", -1), ("lambda_steps", 1.5),
                                         ("gate_lr", 0.0), ("gate_optimizer", "lion"),
                                         ("threshold", "hard"), ("loss_lambda", -1e-3)])
def test_invalid_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} "):
        lr.adapters.config("sora", **{field: value})


def test_scheduled_lambda_needs_max_lambda():
    with pytest.raises(ValueError, match="^max_lambda must be given"):
        lr.adapters.config("sora", lambda_schedule="linear")


@pytest.mark.parametrize("zeros", [[], [1], [0, 2], [0, 1, 2]], ids=["none", "one", "two", "all"])
def test_prune_gives_an_equal_lora_of_the_kept_rank(xp, zeros):
    layer = make(xp, dropout=0.2)
    g = layer.lora_gate.data
    for k in zeros:
        g[k] = 0.0
    pruned = layer.prune()
    assert type(pruned) is LoraLinear
    kept = R - len(zeros)
    assert layer.kept_rank() == kept and pruned.lora_A.shape == (max(kept, 1), N)
    assert pruned.config.r == max(kept, 1) and pruned.scaling == layer.scaling
    rng = np.random.default_rng(8)
    x = xp.asarray(rng.standard_normal((2, ROWS, N)))
    mask = xp.asarray((rng.random((2, ROWS, N)) > 0.2) / 0.8)
    layer.eval(), pruned.eval()
    assert rel_err(pruned.forward(x)[0], layer.forward(x)[0]) < 1e-12
    assert rel_err(pruned.forward(x, dropout_mask=mask)[0],
                   layer.forward(x, dropout_mask=mask)[0]) < 1e-12
    assert rel_err(pruned.delta_weight(), layer.delta_weight()) < 1e-12 or kept == 0
    assert float(abs(pruned.delta_weight() - layer.delta_weight()).max()) < 1e-12


def test_prune_of_a_merged_layer_stays_merged(xp):
    layer = make(xp)
    layer.lora_gate.data[1] = 0.0
    x = xp.asarray(np.random.default_rng(9).standard_normal((ROWS, N)))
    y = layer.eval().forward(x)[0]
    layer.merge()
    pruned = layer.prune()
    assert pruned.merged
    pruned.unmerge()
    assert rel_err(pruned.forward(x)[0], y) < 1e-12


def _sora_model(xp=None, dtype="float64", **options):
    model = GPT(TINY, seed=0, dtype=dtype, xp=xp)
    cfg = lr.adapters.config("sora", **{"r": 4, "alpha": 8.0, **options})
    lr.adapters.inject(model, cfg, ["q", "v", "fc1"])
    return model


def test_training_zeroes_gates_and_prune_sora_keeps_the_logits(xp):
    model = _sora_model(xp, sparse_lambda=0.2)
    trainer = Trainer(model, FakeData(TINY), TrainConfig(steps=6, batch_size=2, lr=1e-2, warmup=0))
    assert not any(n.endswith("lora_gate") for n in trainer.optimizer.params)   # the hook owns them
    trainer.fit(progress=False)
    gates = np.concatenate([to_host(m.lora_gate.data)
                            for _, m in lr.adapters.adapted_modules(model)])
    assert (gates == 0.0).sum() > 0 and (gates != 0.0).sum() > 0
    lines = SoraLinear.report(model, None)
    assert len(lines) == 6 and "kept" in lines[0]
    idx = xp.asarray(np.arange(16).reshape(2, 8) % TINY.vocab_size)
    model.eval()
    before, _ = model.forward(idx)
    kept = prune_sora(model)
    modules = dict(lr.adapters.adapted_modules(model))
    assert all(type(m) is LoraLinear for m in modules.values())
    assert {n: modules[n].lora_A.shape[0] for n in kept} == {n: max(k, 1) for n, k in kept.items()}
    assert sum(kept.values()) == int((gates != 0.0).sum())
    after, _ = model.forward(idx)
    assert rel_err(after, before) < 1e-12


def test_resume_restores_the_gate_optimizer_exactly(tmp_path):
    config = TrainConfig(steps=6, batch_size=2, lr=1e-2, warmup=3)
    options = dict(dropout=0.1, sparse_lambda=0.02)

    def fresh():
        model = _sora_model(**options)
        return model, Trainer(model, FakeData(TINY), config)

    straight, tr = fresh()
    tr.fit(progress=False)

    model, tr = fresh()
    for _ in range(3):
        tr.train_step()
    checkpoint.save_adapter(model, tmp_path)
    checkpoint.save_training_state(tmp_path, tr.step, tr.optimizer.state_dict(),
                                   tr.rng.bit_generator.state, wf._extra_state(tr))
    assert tr.hooks[0].state_dict()["gates"]   # Adam moments of every gate are saved

    resumed, tr2 = fresh()
    wf._resume(tmp_path, tr2, lambda: checkpoint.load_adapter(resumed, tmp_path))
    assert tr2.step == 3
    tr2.fit(progress=False)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert np.array_equal(to_host(p.data), to_host(q.data)), name


def test_report_facts_and_metadata(xp):
    layer = make(xp)
    layer.lora_gate.data[0] = 0.0
    holder = lr.nn.module.Module()
    holder.q = layer
    assert SoraLinear.report(holder, None).facts == {"q": {"kept_rank": R - 1, "r": R}}
    assert layer.adapter_metadata() == {"kept_rank": R - 1}
    assert backend.get_namespace(layer.lora_gate.data) is xp
