"""lowrank's defaults against the official training pipelines, step by step: IncreLoRA's forked
Hugging Face Trainer (compute_svd_orth_regu, Multi_LambdaLR, transformers.AdamW), ReLoRA's
current schedule and merge step, RoSA's two runs, and the schedules and AdamW forms every
variant can select (docs/variants.md#official-training).

The oracles are ``reference/official.py`` (transcribed from the official files at the commits
named there; nothing shared with lowrank). Each test names, in its docstring, the old behaviour
it fails on.
"""
import copy

import numpy as np
import pytest

import lowrank as lr
from lowrank.adapters.relora import ReLoraHook
from lowrank.adapters.rosa import RosaHook, RosaLinear
from lowrank.models import GPT, GPTConfig
from lowrank.nn.optim import AdamW
from lowrank.nn.schedules import scheduled_lr
from lowrank.training.trainer import Trainer, TrainConfig
from reference import official

from tests.helpers.common import FakeData, to_host
from tests.oracles.test_official import _dense_S, _model_of, _rosa_layer, _trainer

TINY = GPTConfig(vocab_size=64, context=8, n_layer=2, n_head=2, d_model=16)


# --- schedules and AdamW forms ------------------------------------------------------------------
def test_linear_schedule_is_hf_get_linear_schedule_with_warmup():
    """Step 0 at lr 0, linear up over W, linear down to 0 at T (the old warm-up + cosine gave
    lr/W at step 0)."""
    for W, T in [(0, 10), (3, 10), (4, 4), (10, 7)]:
        got = [scheduled_lr("linear", t, 0.1, W, T) for t in range(T + 2)]
        want = [0.1 * official.hf_linear_lambda(t, W, T) for t in range(T + 2)]
        assert got == want


def test_schedules_match_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    makers = {"linear": transformers.get_linear_schedule_with_warmup,
              "cosine": transformers.get_cosine_schedule_with_warmup,
              "constant": lambda opt, W, T: transformers.get_constant_schedule_with_warmup(opt, W)}
    for name, make in makers.items():
        for W, T in [(0, 12), (3, 12), (5, 9)]:
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            sched = make(opt, W, T)
            want = []
            for _ in range(T + 1):
                want.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
            got = [scheduled_lr(name, t, 0.1, W, T) for t in range(T + 1)]
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_hf_adamw_form_matches_transformers_adamw(wd):
    """form="hf": ε on √v before the bias correction, the decay after the update on the updated
    weights; torch's form (the old only one) differs at the first step already."""
    rng = np.random.default_rng(0)
    p = lr.nn.module.Parameter(rng.standard_normal((4, 3)))
    q = lr.nn.module.Parameter(p.data.copy())
    opt = AdamW([("p", p)], lr=0.01, weight_decay=wd, eps=1e-3, form="hf")
    torch_form = AdamW([("q", q)], lr=0.01, weight_decay=wd, eps=1e-3)
    ref = official.HFAdamW([{"params": ["p"]}], lr=0.01, eps=1e-3, weight_decay=wd)
    want = {"p": p.data.copy()}
    for t in range(5):
        g = rng.standard_normal((4, 3)) * 1e-3
        p.grad, q.grad = g.copy(), g.copy()
        opt.step(0.01 * (t + 1))
        torch_form.step(0.01 * (t + 1))
        ref.param_groups[0]["lr"] = 0.01 * (t + 1)
        ref.step(want, {"p": g})
        np.testing.assert_allclose(p.data, want["p"], rtol=1e-14, atol=1e-16)
    assert np.abs(q.data - p.data).max() > 1e-6


def test_each_variant_defaults_to_its_official_schedule_and_adamw():
    """SoRA, IncreLoRA: linear + HF AdamW (Hugging Face Trainer); RoSA: linear (composer's
    linear_decay_with_warmup), torch's form; LoRA: lowrank's cosine and torch's form; the
    config's choice wins. The old Trainer had only the cosine and torch's form."""
    expect = {"sora": ("linear", "hf"), "increlora": ("linear", "hf"),
              "rosa": ("linear", "torch"), "lora": ("lowrank_cosine", "torch"),
              "relora": ("lowrank_cosine", "torch")}
    for variant, (schedule, form) in expect.items():
        model = GPT(TINY, seed=0, dtype="float64")
        lr.adapters.inject(model, lr.adapters.config(variant, r=2, alpha=4.0), ["q"])
        trainer = Trainer(model, FakeData(TINY), TrainConfig(steps=4, batch_size=2, warmup=2))
        assert (trainer.schedule_name, trainer.adamw_form) == (schedule, form), variant
        assert trainer.optimizer.form == form
        if schedule == "linear":
            assert trainer.lr_at(0) == 0.0
        chosen = Trainer(model, FakeData(TINY), TrainConfig(steps=4, batch_size=2, warmup=2,
                                                            schedule="constant", adamw="torch"))
        assert (chosen.schedule_name, chosen.adamw_form) == ("constant", "torch")


# --- ReLoRA: the current lambda and the merge step --------------------------------------------------
RELORA_CONFIGS = [(24, 0, 8, 4, 0.25), (1000, 100, 200, 50, 0.1), (40, 5, 10, 3, 0.1),
                  (30, 2, 6, 6, 1.0), (50, 0, 7, 3, 0.05)]


@pytest.mark.parametrize("T,W0,K,W,rho", RELORA_CONFIGS)
def test_relora_lambda_is_the_current_official_one(T, W0, K, W, rho):
    """The current lambda (no restart warm-up in the first cycle, warming up to the cosine at
    the warm-up's end); "official_2023" keeps the May 2023 one. The old default (the May 2023
    lambda) fails the first config at step 0 (0 instead of 1)."""
    from lowrank.adapters.relora import official_2023_lr_lambda, official_lr_lambda
    got = [official_lr_lambda(t, T, W0, W, K, rho) for t in range(T)]
    want = [official.relora_lr_lambda(t, num_training_steps=T, first_warmup_steps=W0,
                                      restart_warmup_steps=W, restart_every=K,
                                      min_lr_ratio=rho) for t in range(T)]
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-15
    old = [official_2023_lr_lambda(t, T, W0, W, K, rho) for t in range(T)]
    np.testing.assert_allclose(old, [official.relora_lr_lambda_may2023(
        t, num_training_steps=T, first_warmup_steps=W0, restart_warmup_steps=W,
        restart_every=K, min_lr_ratio=rho) for t in range(T)], rtol=0, atol=1e-15)
    if (T, W0, K, W, rho) == (24, 0, 8, 4, 0.25):
        np.testing.assert_allclose(got[:4], [1.0, 0.997, 0.987, 0.972], atol=6e-4)   # the
        # issue's figures, where the May 2023 lambda gives 0, 0.25, 0.5, 0.75


def test_relora_merges_after_the_lr0_step_as_the_official_loop():
    """ReLoRA layer + hook + AdamW against torchrun_main.py's loop (magnitude pruning 0.6,
    K = 3, 11 steps: merges after updates 4, 7 and 10): W0, A, B after every step. Restarting
    after K, 2K, … completed steps (the old rule) merges one step early and fails at step 3."""
    rng = np.random.default_rng(0)
    T, K = 11, 3
    cfg = lr.adapters.config("relora", r=2, alpha=4.0, reset_interval=K, restart_warmup=1,
                             optimizer_reset="magnitude", reset_ratio=0.6, min_lr_ratio=0.1)
    layer = lr.adapters.AdaptedLinear(rng.standard_normal((5, 4)), None, cfg, seed=0)
    layer.lora_B.data = 0.3 * rng.standard_normal((5, 2))
    hook = ReLoraHook(_model_of(layer))
    opt = AdamW([(n, p) for n, p in layer.named_parameters(trainable_only=True)], lr=0.05,
                weight_decay=0.0)
    trainer = _trainer(T, lr_=0.05, warmup=1, min_lr=0.005, optimizer=opt, hooks=[hook])

    def lam(step):
        return official.relora_lr_lambda(step, num_training_steps=T, first_warmup_steps=1,
                                         restart_warmup_steps=1, restart_every=K,
                                         min_lr_ratio=0.1)
    loop = official.ReLoraOfficialLoop(layer.weight.data, layer.lora_A.data, layer.lora_B.data,
                                       layer.scaling, lr=0.05, K=K, lr_lambda=lam,
                                       prune_ratio=0.6, new_A=lambda: layer.lora_A.data)
    merges, worst = [], 0.0
    for t in range(T):
        x, G = rng.standard_normal((6, 4)), rng.standard_normal((6, 5))
        trainer.step = t
        layer.zero_grad()
        _, cache = layer.forward(x)
        layer.backward(G, cache)
        opt.step(trainer.lr_at(t))
        hook.after_step(trainer)
        if loop.step(x, G):
            merges.append(t + 1)
        for got, want in ((layer.weight.data, loop.W), (layer.lora_A.data, loop.A),
                          (layer.lora_B.data, loop.B)):
            worst = max(worst, float(np.abs(to_host(got) - want).max()))
            np.testing.assert_allclose(to_host(got), want, rtol=1e-10, atol=1e-12,
                                       err_msg=f"step {t}")
    assert merges == [4, 7, 10] and layer.restarts == 3
    print(f"relora max error {worst:.2e}")


# --- IncreLoRA: the forked Trainer ------------------------------------------------------------------
@pytest.mark.parametrize("advance", [True, False], ids=["advance-learning", "no-advance"])
def test_increlora_steps_match_the_official_trainer(advance):
    """Three layers, budget 7 from 3, growths at g = 2 and 4; 9 steps of the linear schedule
    (warm-up 2) and HF AdamW: every A, E, B and ranknum after each step equals the forked
    Trainer (compute_svd_orth_regu, Multi_LambdaLR, transformers.AdamW). Fails with the old
    per-tensor regulariser, the constant lr of added groups, or torch's AdamW form."""
    from lowrank.adapters._increlora_hook import IncreLoraHook
    rng = np.random.default_rng(8)
    shapes, T = [(6, 5), (5, 7), (4, 4)], 9
    cfg = lr.adapters.config("increlora", r=2, alpha=3.0, init_r=1, add_r=1, top_h=2,
                             init_warmup=1, incre_interval=2, total_budget=7,
                             advance_learning=advance, reg_orth_coef=0.5)
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
    trainer = _trainer(T, lr_=0.05, warmup=2, optimizer=AdamW([], lr=0.05), hooks=[hook],
                       schedule_name="linear", adamw="hf")
    ref = official.NaiveIncreLoraTrainer(
        naive, target_rank=7, add_r=1, top_h=2, init_warmup=1, incre_interval=2, beta1=0.85,
        beta2=0.85, advance_learn=advance, lr=0.05, warmup=2, total_steps=T,
        reg_orth_coef=0.5)
    worst = 0.0
    for g in range(T):
        trainer.step = g
        batches = [(rng.standard_normal((5, m.in_features)),
                    rng.standard_normal((5, m.out_features))) for m in layers]
        for layer, (x, G) in zip(layers, batches):
            layer.zero_grad()
            _, cache = layer.forward(x)
            layer.backward(G, cache)
        hook.extra_loss(trainer)
        hook.after_step(trainer)
        ref.step(g, batches)
        for i, (layer, want) in enumerate(zip(layers, naive)):
            assert layer.ranknum == int(want.ranknum), (g, i)
            for got, exp in ((layer.lora_A.data, np.concatenate(want.A, 0)),
                             (layer.lora_E.data, np.concatenate(want.E, 0).reshape(-1)),
                             (layer.lora_B.data, np.concatenate(want.B, 1))):
                worst = max(worst, float(np.abs(to_host(got) - exp).max()))
                np.testing.assert_allclose(to_host(got), exp, rtol=1e-9, atol=1e-13,
                                           err_msg=f"step {g}, layer {i}")
    assert sum(m.ranknum for m in layers) == 7 and [h[0] for h in hook.history] == [2, 2, 4, 4]
    assert len(ref.optimizer.param_groups) == (4 if advance else 3)
    print(f"increlora max error {worst:.2e}")


def test_increlora_svd_regulariser_value_and_gradient():
    """The value and gradient of compute_svd_orth_regu (cross-triplet terms included); the
    old per-tensor form gives another value."""
    from lowrank.adapters._increlora_hook import IncreLoraHook
    rng = np.random.default_rng(3)
    cfg = lr.adapters.config("increlora", r=3, alpha=2.0, init_r=1, add_r=2, reg_orth_coef=0.1)
    layers = [lr.adapters.AdaptedLinear(rng.standard_normal((5, 6)), None, cfg, seed=0)]
    layers[0].add_reserve(2)
    hook = IncreLoraHook([("l0", layers[0])])
    m = layers[0]
    value = hook.orth_regulariser()
    naive = official.NaiveIncreLoraLayer(m.weight.data, m.lora_A.data, m.lora_E.data,
                                         m.lora_B.data, 2.0, None)
    want, grads = official.compute_svd_orth_regu([naive])
    assert value == pytest.approx(0.1 * want, rel=1e-13)
    np.testing.assert_allclose(m.lora_A.grad, 0.1 * grads[(0, "A")], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(m.lora_B.grad, 0.1 * grads[(0, "B")], rtol=1e-12, atol=1e-15)
    m.config.orth_form = "per_tensor"
    assert abs(hook.orth_regulariser() - value) > 1e-6


# --- RoSA: the two runs, accumulation -------------------------------------------------------------
@pytest.mark.parametrize("mode,lora_lr,micro", [("mean_squared", None, 1), ("mean", None, 1),
                                                ("mean_squared", 0.15, 2)])
def test_rosa_restart_run_matches_the_official_two_runs(mode, lora_lr, micro):
    """warm-up 2 + collection 2 steps, then the second run over the seed's batches from the
    start, linear schedule over the second run's 5 steps (both runs), ``micro`` micro-batches
    per step (each backward's Gᵀx squared): A, B, S after each second-run step. The old
    cosine schedule, or continuing the data, fails."""
    steps, warmup, collect = 9, 2, 2
    layer = _rosa_layer(warmup_steps=warmup, collect_steps=collect, grad_acc_mode=mode,
                        lora_lr=lora_lr)
    A0, B0 = to_host(layer.lora_A.data).copy(), to_host(layer.lora_B.data).copy()
    layer.initial_lora = (layer.lora_A.data.copy(), layer.lora_B.data.copy())   # B moved off 0
    rng = np.random.default_rng(4)
    batches = [[(rng.standard_normal((7, 5)), rng.standard_normal((7, 6)))
                for _ in range(micro)] for _ in range(steps)]
    hook = RosaHook(RosaLinear.layers_of(_model_of(layer)))
    trainer = _trainer(steps, lr_=0.05, warmup=2, hooks=[hook], schedule_name="linear",
                       model=layer)
    hook.bind(trainer)
    opt = AdamW([(n, p) for n, p in layer.named_parameters(trainable_only=True)
                 if not hook.owns(n, p)], lr=0.05, weight_decay=0.0)
    trainer.optimizer = opt
    got, k = [], warmup + collect
    order = list(range(k)) + list(range(steps - k))   # the second run: the seed's data again
    for t, b in enumerate(order):
        trainer.step = t
        layer.zero_grad()
        for x, G in batches[b]:
            _, cache = layer.forward(x)
            layer.backward(G, cache)
        hook.extra_loss(trainer)
        opt.step(trainer.lr_at(t))
        hook.after_step(trainer)
        if t >= k:
            got.append((to_host(layer.lora_A.data).copy(), to_host(layer.lora_B.data).copy(),
                        _dense_S(layer)))
    want = official.rosa_official_run(layer.weight.data, A0, B0, layer.scaling, batches,
                                      density=0.3, warmup=warmup, collect=collect, lr=0.05,
                                      lr_warmup=2, steps=steps, grad_acc_mode=mode,
                                      lora_lr=lora_lr)
    assert hook.restarted_at == k and len(got) == len(want) == steps - k
    rates = [0.05 * official.composer_linear_with_warmup(t, 2, steps - k) for t in range(k)]
    rates += [0.05 * official.composer_linear_with_warmup(t, 2, steps - k)
              for t in range(steps - k)]
    np.testing.assert_allclose([trainer.lr_at(t) for t in range(steps)], rates, rtol=1e-15)
    worst = 0.0
    for (A, B, S), (wA, wB, wS) in zip(got, want):
        for a, w in ((A, wA), (B, wB), (S, wS)):
            worst = max(worst, float(np.abs(a - w).max()))
            np.testing.assert_allclose(a, w, rtol=1e-9, atol=1e-12)
    assert np.count_nonzero(got[-1][2]) == layer.nnz
    print(f"rosa max error {worst:.2e}")


def _rosa_gpt(**options):
    model = GPT(TINY, seed=0, dtype="float64")
    cfg = lr.adapters.config("rosa", **{"r": 2, "alpha": 4.0, "density": 0.05, "dropout": 0.1,
                                        "warmup_steps": 1, "collect_steps": 1, **options})
    lr.adapters.inject(model, cfg, ["q", "fc1"])
    return model


def test_rosa_restart_starts_data_dropout_and_every_trainable_parameter_again():
    """The second run is a new process from the pretrained model: after the restart the
    batch stream and the dropout streams are the seed's again, and a trainable non-adapter
    parameter (here the final layer norm) is back at its start. The old restart continued
    the data and dropout and kept the first run's layer norm."""
    model = _rosa_gpt()
    model.ln_f.weight.trainable = True
    start_ln = to_host(model.ln_f.weight.data).copy()
    trainer = Trainer(model, FakeData(TINY), TrainConfig(steps=6, batch_size=2, lr=1e-2))
    fresh = np.random.Generator(np.random.PCG64(trainer.config.seed)).bit_generator.state
    dropout0 = copy.deepcopy(trainer.dropout_states())
    trainer.train_step()
    trainer.train_step()                        # step 2 ends the collection: restart
    assert trainer.hooks[0].restarted_at == 2
    assert trainer.rng.bit_generator.state == fresh
    assert trainer.dropout_states() == dropout0
    np.testing.assert_array_equal(to_host(model.ln_f.weight.data), start_ln)
    assert trainer.optimizer.step_of(model.ln_f.weight) == 0


def test_rosa_squares_each_micro_batch_under_shards_and_accumulation():
    """accum_steps 2 with batch shards 2: the score is Σ over micro-batches of (Gᵀx)², the
    same as without shards; the old rule (square the step's summed Gᵀx under shards) gives
    a different score."""
    scores = {}
    for shards in (1, 2):
        model = _rosa_gpt(warmup_steps=0, collect_steps=2, dropout=0.0)
        captured = {}
        original = RosaLinear.select_support

        def record(self, captured=captured, original=original):
            captured.setdefault("s", to_host(self.score).copy())
            original(self)
        RosaLinear.select_support = record
        try:
            trainer = Trainer(model, FakeData(TINY), TrainConfig(
                steps=3, batch_size=4, lr=1e-2, accum_steps=2, shards=shards))
            trainer.train_step()
            trainer.train_step()
        finally:
            RosaLinear.select_support = original
        scores[shards] = captured["s"]
    np.testing.assert_allclose(scores[2], scores[1], rtol=1e-10, atol=1e-14)
