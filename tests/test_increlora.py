"""IncreLoRA (SPEC §2.7): gradients, the growth schedule and budget, identical outputs across a
growth, fresh optimizer state for grown parameters, budget validation, exact resume."""
import copy

import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.adapters._increlora_hook import IncreLoraHook
from lowrank.adapters.increlora import IncreLoraLinear
from lowrank.models import GPT, GPTConfig
from lowrank.train import Trainer, TrainConfig

from .helpers import FakeData, layer_fd_gradient, rel_err

TINY = GPTConfig(vocab_size=64, context=8, n_layer=2, n_head=2, d_model=16)
M, N, ROWS = 6, 5, 4


def layer(xp, dtype="float64", **options):
    rng = np.random.default_rng(0)
    W0 = xp.asarray(rng.standard_normal((M, N)), dtype=dtype)
    b0 = xp.asarray(rng.standard_normal(M), dtype=dtype)
    cfg = lr.adapters.config("increlora", **{"r": 4, "alpha": 3.0, "init_r": 1, **options})
    return lr.adapters.AdaptedLinear(W0, b0, cfg, seed=0)


def perturb(m, xp, seed=1):
    rng = np.random.default_rng(seed)
    for _, p in m.named_parameters(trainable_only=True):
        p.data += xp.asarray(0.5 * rng.standard_normal(p.shape), dtype=p.dtype)


def fd_errors(m, xp, mask=None):
    """Relative error of every hand-derived gradient (A, E, B, x) against central differences."""
    rng = np.random.default_rng(7)
    x = xp.asarray(rng.standard_normal((ROWS, N)))
    G = xp.asarray(rng.standard_normal((ROWS, M)))
    m.zero_grad()
    y, cache = m.forward(x, dropout_mask=mask)
    dx = m.backward(G, cache)
    arrays = {"lora_A": m.lora_A.data, "lora_E": m.lora_E.data, "lora_B": m.lora_B.data, "x": x}
    analytic = {"lora_A": m.lora_A.grad, "lora_E": m.lora_E.grad, "lora_B": m.lora_B.grad,
                "x": dx}
    errors = {}
    for name, array in arrays.items():
        numeric = layer_fd_gradient(m, array, x, G, mask)
        errors[name] = rel_err(analytic[name], numeric)
    return errors


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout-mask"])
def test_gradients_match_finite_differences_after_growth(xp, with_mask):
    m = layer(xp, dropout=0.3 if with_mask else 0.0)
    m.grow(2)   # ranknum 3: c = α/3 and the grown arrays
    perturb(m, xp)
    mask = xp.asarray((np.random.default_rng(3).random((ROWS, N)) > 0.3) / 0.7) \
        if with_mask else None
    errors = fd_errors(m, xp, mask)
    assert max(errors.values()) < 1e-6, errors


def test_growth_keeps_the_output_and_rescales_E(xp):
    m = layer(xp)
    perturb(m, xp)
    x = xp.asarray(np.random.default_rng(5).standard_normal((ROWS, N)))
    before = m.forward(x)[0]
    E_before, c_before = m.lora_E.data.copy(), m.scaling
    m.grow(2)
    assert m.ranknum == 3 and m.lora_A.shape == (3, N) and m.lora_B.shape == (M, 3)
    assert float(abs(m.lora_E.data[1:]).max()) == 0.0          # new triplets start with E = 0
    assert rel_err(m.lora_E.data[:1], E_before * (c_before / m.scaling)) < 1e-15
    assert rel_err(m.forward(x)[0], before) <= 1e-12
    with pytest.raises(ValueError, match=r"^k must be an integer in 1\.\.2"):
        m.grow(3)   # capacity min(6, 5) = 5


def test_budget_below_the_starting_rank_raises(xp):
    with pytest.raises(ValueError, match="^init_r must be <= r"):
        lr.adapters.config("increlora", r=2, init_r=3)
    with pytest.raises(ValueError, match="^total_budget must be >= init_r"):
        lr.adapters.config("increlora", r=4, init_r=2, total_budget=1)
    for field, value in [("add_r", 0), ("top_h", 0), ("incre_interval", 0), ("init_warmup", -1),
                         ("beta1", 1.0), ("beta2", 0.0), ("init_r", 0)]:
        with pytest.raises(ValueError, match=rf"^{field} "):
            lr.adapters.config("increlora", **{field: value})
    model = tiny_model(xp, total_budget=3)   # 4 modules start at 1 each: Σ init_r = 4
    with pytest.raises(ValueError, match=r"^total_budget must be >= the starting total rank 4"):
        Trainer(model, FakeData(TINY), TrainConfig(steps=2, batch_size=2))
    model = tiny_model(xp, total_budget=65)  # 4 modules of 16x16: room for 64
    with pytest.raises(ValueError, match=r"^total_budget must be <= Σ min\(m, n\) = 64"):
        Trainer(model, FakeData(TINY), TrainConfig(steps=2, batch_size=2))


def tiny_model(xp=None, dtype="float64", **options):
    model = GPT(TINY, seed=0, dtype=dtype, xp=xp)
    cfg = {"r": 3, "alpha": 4.0, "init_r": 1, "add_r": 2, "top_h": 2, "init_warmup": 2,
           "incre_interval": 2, **options}
    lr.adapters.inject(model, lr.adapters.config("increlora", **cfg), ["q", "v"])
    return model


def trainer_for(model, steps, **train):
    return Trainer(model, FakeData(TINY), TrainConfig(**{"steps": steps, "batch_size": 2, "lr": 1e-2,
                                                    "warmup": 1, **train}))


def ranks(model):
    return {n: m.ranknum for n, m in lr.adapters.adapted_modules(model)}


@pytest.mark.parametrize("budget,growths", [(None, [4, 4, 6, 6]), (7, [4, 4])])
def test_growth_on_schedule_reaches_the_budget_exactly(xp, budget, growths):
    """4 modules at rank 1; budget Σ r = 12 (or 7); top_h = 2 modules gain add_r = 2 at
    completed steps 4, 6, ... (> init_warmup = 2, every 2); the last one gets what is left."""
    model = tiny_model(xp, total_budget=budget)
    trainer = trainer_for(model, 10)
    hook = trainer.hooks[0]
    assert isinstance(hook, IncreLoraHook) and hook.budget == (budget or 12)
    seen = []
    while trainer.step < trainer.config.steps:
        trainer.train_step()
        seen.append(sum(ranks(model).values()))
    assert [h[0] for h in hook.history] == growths
    assert sum(ranks(model).values()) == hook.budget
    want = [4, 4, 4, 8, 8, 12, 12, 12, 12, 12] if budget is None else [4, 4, 4, 7] + [7] * 6
    assert seen == want
    if budget == 7:
        assert sorted(h[2] for h in hook.history) == [1, 2]
    # the budget is reached: no more score work
    assert not any(m.track_score for _, m in hook.layers)
    lines = IncreLoraLinear.report(model, None)
    assert lines[0].startswith(f"IncreLoRA: total rank {hook.budget} of budget {hook.budget} "
                               "(reached; started at 4)")
    assert len(lines) == 5 and all(line.split()[-2] == "rank" for line in lines[1:])


def test_model_output_is_identical_across_a_growth_and_new_params_get_fresh_state(xp):
    model = tiny_model(xp, init_warmup=4, incre_interval=5)
    trainer = trainer_for(model, 10)
    hook = trainer.hooks[0]
    for _ in range(3):              # E moves off zero; no scheduled growth before step 5
        trainer.train_step()
    idx = xp.asarray(np.random.default_rng(2).integers(0, TINY.vocab_size, (2, TINY.context)))
    model.eval()
    before, _ = model.forward(idx)
    grown = hook.grow(trainer, step=3)
    after, _ = model.forward(idx)
    model.train()
    assert len(grown) == 2
    assert rel_err(after, before) <= 1e-12
    names = {m: n for n, m in model.named_parameters()}
    state = trainer.optimizer.state
    for name, m in lr.adapters.adapted_modules(model):
        params = [f"{name}.lora_{p}" for p in "AEB"]
        if name in dict(grown):
            assert m.ranknum == 3 and all(p not in state for p in params)
        else:
            assert m.ranknum == 1 and all(state[p]["step"] == 3 for p in params)
    assert set(trainer.optimizer.params) == {n for n in names.values() if ".lora_" in n}
    trainer.train_step()            # the grown parameters take their first AdamW step: t = 1
    for name, _ in grown:
        st = state[f"{name}.lora_E"]
        assert st["step"] == 1 and st["exp_avg"].shape == (3,)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_bit_identical(xp, dropout, tmp_path):
    """9 steps straight, or 5 + (fresh model and trainer, the adapter loaded from a checkpoint
    as workflows.finetune --resume does, then the trainer state) + 4."""
    from lowrank import checkpoint

    def fresh():
        model = tiny_model(xp, dropout=dropout)
        return model, trainer_for(model, 9)

    straight, tr_straight = fresh()
    tr_straight.fit(progress=False)
    half, tr = fresh()
    for _ in range(5):
        tr.train_step()
    checkpoint.save_adapter(half, tmp_path)
    state = copy.deepcopy(tr.state_dict())
    resumed, tr = fresh()
    checkpoint.load_adapter(resumed, tmp_path)   # grows the layers to the saved ranks
    tr.load_state_dict(state)
    tr.fit(progress=False)
    assert ranks(resumed) == ranks(straight) and sum(ranks(straight).values()) == 12
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert np.array_equal(backend.to_numpy(p.data), backend.to_numpy(q.data)), name
    assert tr.hooks[0].history == tr_straight.hooks[0].history
    assert [h[0] for h in tr.hooks[0].history] == [4, 4, 6, 6]


def test_resume_before_the_weights_raises(xp):
    model = tiny_model(xp)
    tr = trainer_for(model, 6)
    for _ in range(4):
        tr.train_step()
    state = copy.deepcopy(tr.state_dict())
    with pytest.raises(ValueError, match="load the adapter weights first"):
        trainer_for(tiny_model(xp), 6).load_state_dict(state)


def test_save_and_load_adopt_the_grown_rank(tmp_path):
    from lowrank import checkpoint
    model = tiny_model()
    tr = trainer_for(model, 7)
    tr.fit(progress=False)
    checkpoint.save_adapter(model, tmp_path)
    loaded = tiny_model()
    checkpoint.load_adapter(loaded, tmp_path)
    assert ranks(loaded) == ranks(model) and sum(ranks(model).values()) == 12
    idx = np.arange(16).reshape(2, 8) % TINY.vocab_size
    assert np.array_equal(model.eval().forward(idx)[0], loaded.eval().forward(idx)[0])
    assert [m.demo_report() for _, m in lr.adapters.adapted_modules(loaded)] == \
        [{"ranknum": r} for r in ranks(model).values()]


def test_finetune_resume_and_load_finetuned(tmp_path):
    """workflows.finetune --resume and load_finetuned with grown ranks (float64, CPU)."""
    import inspect
    import json as json_module

    from lowrank import workflows as wf
    text = tmp_path / "corpus.txt"
    text.write_text(inspect.getsource(json_module.decoder) * 2)
    data = wf.DataSpec([str(text)], val_fraction=0.2)
    spec = wf.ModelSpec(vocab_size=300, context=16, n_layer=1, n_head=2, d_model=16)
    wf.pretrain(tmp_path / "base", spec, data, TrainConfig(steps=2, batch_size=4),
                dtype="float64", progress=False)
    options = {"r": 3, "alpha": 4.0, "init_r": 1, "add_r": 2, "top_h": 1, "init_warmup": 1,
               "incre_interval": 2, "dropout": 0.1}

    def run(out, steps, resume=False):   # warm-up 10 > steps: the LR does not depend on steps
        return wf.finetune(out, tmp_path / "base", "increlora", ["q", "v"], options, data,
                           TrainConfig(steps=steps, batch_size=4, lr=1e-2), resume=resume,
                           progress=False)
    straight = run(tmp_path / "one", 8)
    run(tmp_path / "two", 4)
    run(tmp_path / "two", 8, resume=True)
    assert straight.report[0] == "IncreLoRA: total rank 6 of budget 6 (reached; started at 2)"
    a, _ = wf.load_finetuned(tmp_path / "base", tmp_path / "one")
    b, _ = wf.load_finetuned(tmp_path / "base", tmp_path / "two")
    for (name, p), (_, q), (_, s) in zip(a.named_parameters(), b.named_parameters(),
                                         straight.model.named_parameters()):
        assert np.array_equal(p.data, q.data) and np.array_equal(p.data, s.data), name
