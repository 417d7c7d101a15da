"""IncreLoRA (docs/variants.md#increlora): gradients (reserves included), the growth schedule and
budget, the official growth against the output-preserving option, per-triplet optimizer state,
budget validation, exact resume."""
import copy

import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.adapters._increlora_hook import IncreLoraHook
from lowrank.adapters.increlora import IncreLoraLinear
from lowrank.models import GPT, GPTConfig
from lowrank.training.trainer import Trainer, TrainConfig

from tests.helpers.common import FakeData, gradient_errors, make_layer, perturb, pretrain_tiny_base, problem, rel_err

TINY = GPTConfig(vocab_size=64, context=8, n_layer=2, n_head=2, d_model=16)
M, N, ROWS = 6, 5, 4


def layer(xp, dtype="float64", **options):
    """An IncreLoRA layer (M, N) starting at rank 1 of an average budget of 4."""
    return make_layer(xp, "increlora", (M, N), dtype,
                      **{"r": 4, "alpha": 3.0, "init_r": 1, **options})[0]


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout-mask"])
def test_gradients_match_finite_differences_after_growth(xp, with_mask):
    m = layer(xp, dropout=0.3 if with_mask else 0.0)
    m.grow(2)   # ranknum 3: c = α/3 and the grown arrays
    perturb(m, xp)
    x, G, mask = problem(xp, (M, N), ROWS, dropout=0.3 if with_mask else 0.0)
    errors = gradient_errors(m, x, G, mask)
    assert set(errors) == {"lora_A", "lora_E", "lora_B", "x"}
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("growth", ["official", "rescale"])
def test_growth_official_shrinks_the_old_triplets_rescale_keeps_the_output(xp, growth):
    """official: ranknum += k with E untouched, so c B diag(E) A of the old triplets shrinks by
    ranknum/(ranknum + k); "rescale" multiplies E by c_old/c_new: the output is unchanged
    (without advance learning the reserves' E is 0)."""
    m = layer(xp, growth=growth, advance_learning=False)
    perturb(m, xp)
    x = xp.asarray(np.random.default_rng(5).standard_normal((ROWS, N)))
    before = m.forward(x)[0]
    delta_before = m.delta_weight()                              # (M, N) c B diag(E) A
    E_before, c_before = m.lora_E.data.copy(), m.scaling
    m.grow(2)
    assert m.ranknum == 3 and m.lora_A.shape == (3, N) and m.lora_B.shape == (M, 3)
    assert float(abs(m.lora_E.data[1:]).max()) == 0.0          # reserves without advance: E = 0
    after = m.forward(x)[0]
    if growth == "rescale":
        assert rel_err(m.lora_E.data[:1], E_before * (c_before / m.scaling)) < 1e-15
        assert rel_err(after, before) <= 1e-12
    else:
        assert rel_err(m.lora_E.data[:1], E_before) == 0.0
        shrink = (1 + 1e-5) / (3 + 1e-5)                         # c_new / c_old
        assert rel_err(m.delta_weight(), delta_before * shrink) <= 1e-14
        assert rel_err(after, before) > 1e-3                     # the output jumps
    with pytest.raises(ValueError, match=r"^k must be an integer in 1\.\.2"):
        m.grow(3)   # capacity min(6, 5) = 5


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout-mask"])
def test_gradients_with_advance_learning_reserves_match_finite_differences(xp, with_mask):
    """Reserves (E = 1e-5, A and B trainable) are part of the map: the layer's gradients of
    all R rows match finite differences."""
    m = layer(xp, dropout=0.3 if with_mask else 0.0)
    m.add_reserve(2)
    assert m.rows == 3 and m.ranknum == 1 and float(m.lora_E.data[1]) == 1e-5
    perturb(m, xp)
    x, G, mask = problem(xp, (M, N), ROWS, dropout=0.3 if with_mask else 0.0)
    errors = gradient_errors(m, x, G, mask)
    assert max(errors.values()) < 1e-6, errors


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
    0-based steps g = 4, 6, ... (> init_warmup = 2, every 2; official: after step g's
    backward); the last one gets what is left."""
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
    want = [4, 4, 4, 4, 8, 8, 12, 12, 12, 12] if budget is None else [4] * 4 + [7] * 6
    assert seen == want
    if budget == 7:
        assert sorted(h[2] for h in hook.history) == [1, 2]
    # the budget is reached: no more score work
    assert not any(m.track_score for _, m in hook.layers)
    lines = IncreLoraLinear.report(model, None)
    assert lines[0].startswith(f"IncreLoRA: total rank {hook.budget} of budget {hook.budget} "
                               "(reached; started at 4)")
    assert len(lines) == 5 and all(line.split()[-2] == "rank" for line in lines[1:])


def test_growth_state_per_triplet_as_the_official_param_groups(xp):
    """The hook steps A, E, B with one AdamW state per triplet: at a growth the activated E's
    state starts fresh (first step t = 1 at the next step), the old triplets and the
    pre-trained reserves' A, B keep theirs; new reserves start at t = 0."""
    model = tiny_model(xp, init_warmup=4, incre_interval=5, growth="rescale")
    trainer = trainer_for(model, 10)
    hook = trainer.hooks[0]
    assert not any(".lora_" in n for n in trainer.optimizer.params)   # the hook owns them
    for _ in range(3):
        trainer.train_step()
    for name, m in hook.layers:        # reserves since step 0, pre-trained since step 1
        st = hook.opt[name]
        assert m.rows == 3 and m.ranknum == 1
        assert st["tA"] == [3, 2, 2] and st["tB"] == [3, 2, 2] and st["tE"] == [3, 0, 0]
    grown = dict(hook.grow(trainer, step=3))
    assert len(grown) == 2
    trainer.train_step()
    for name, m in hook.layers:
        st = hook.opt[name]
        if name in grown:
            assert m.ranknum == 3 and m.rows == 5
            assert st["tE"] == [4, 1, 1, 0, 0] and st["tA"] == [4, 3, 3, 1, 1]
            assert st["bAB"] == [-1, 0, 0, 3, 3] and st["bE"] == [-1, 3, 3, 3, 3]
        else:
            assert m.ranknum == 1 and st["tE"] == [4, 0, 0] and st["tA"] == [4, 3, 3]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_bit_identical(xp, dropout, tmp_path):
    """9 steps straight, or 5 + (fresh model and trainer, the adapter loaded from a checkpoint
    as workflows.finetune --resume does, then the trainer state) + 4."""
    from lowrank.formats import checkpoint

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
    from lowrank.formats import checkpoint
    model = tiny_model()
    tr = trainer_for(model, 7)
    tr.fit(progress=False)
    checkpoint.save_adapter(model, tmp_path)
    loaded = tiny_model()
    checkpoint.load_adapter(loaded, tmp_path)
    assert ranks(loaded) == ranks(model) and sum(ranks(model).values()) == 12
    idx = np.arange(16).reshape(2, 8) % TINY.vocab_size
    assert np.array_equal(model.eval().forward(idx)[0], loaded.eval().forward(idx)[0])
    facts = lr.adapters.increlora.IncreLoraLinear.report(loaded, None).facts
    assert list(facts.values()) == [{"ranknum": r} for r in ranks(model).values()]


def test_finetune_resume_and_load_finetuned(tmp_path):
    """workflows.finetune --resume and load_finetuned with grown ranks (float64, CPU)."""
    from lowrank.app import workflows as wf
    data = pretrain_tiny_base(tmp_path)
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
