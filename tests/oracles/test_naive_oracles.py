"""AdaLoRA's allocator and IncreLoRA's growth against naive NumPy oracles, without torch.

A tiny GPT is trained by ``lowrank.training.trainer.Trainer`` for a few steps; the test records, through
public surfaces only (the optimizer's ``step``, each adapted layer's ``forward``/``backward``,
the exported ``rank_pattern`` and the layers' ranks), what the oracle in ``reference/naive.py``
needs, and compares its decisions with lowrank's step by step:

* AdaLoRA (docs/variants.md#adalora-importance): I = |p·grad|, the EMAs Ī and Ū, the triplet
  score S, the cubic budget and the mask -> the rank pattern and the zeroed E after every step;
* IncreLoRA (docs/variants.md#increlora-score): the module score Σ|ΔW ⊙ ∂L/∂ΔW| / √(mn), its
  EMAs and the top-h choice -> which modules grow at each growth step.

Planting |grad| for |p·grad|, or a constant module score, makes these tests fail.
"""
import numpy as np
import pytest

import lowrank as lr
from lowrank.adapters import adalora
from lowrank.training.trainer import Trainer, TrainConfig
from reference import naive

from tests.helpers.common import FakeData

TINY = lr.GPTConfig(vocab_size=32, context=6, n_layer=1, n_head=2, d_model=8)
TARGETS = ["q", "k", "v", "o", "fc1", "fc2"]


def host(a):
    return np.array(lr.backend.to_numpy(a), dtype=np.float64)


def tiny_model(variant, **cfg):
    model = lr.GPT(TINY, seed=3, dtype="float64")
    lr.adapters.inject(model, lr.adapters.config(variant, **cfg), targets=TARGETS, seed=5)
    return model, lr.adapters.adapted_modules(model)


def trainer_for(model, steps):
    cfg = TrainConfig(steps=steps, batch_size=4, lr=2e-2, min_lr=2e-2, warmup=0, grad_clip=1.0,
                      seed=11)
    return Trainer(model, FakeData(TINY), cfg)


# --- AdaLoRA ----------------------------------------------------------------------------------

ADA = dict(r=4, target_r=2, alpha=8.0, tinit=2, tfinal=3, deltaT=2, total_step=10)


def record_after_optimizer(trainer, layers, log):
    """After each AdamW step: ``{name: {"A"|"E"|"B": (p, grad)}}``, what PEFT's update_ipt reads."""
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        log.append({name: {key: (host(getattr(m, f"lora_{key}").data),
                                 host(getattr(m, f"lora_{key}").grad)) for key in "AEB"}
                    for name, m in layers})
        return out
    trainer.optimizer.step = recording_step


def lowrank_scores(trainer):
    """The allocator's triplet scores, when its hook exposes them (else None)."""
    for hook in trainer.hooks:
        allocator = getattr(hook, "allocator", None)
        if allocator is not None and hasattr(allocator, "triplet_scores"):
            return {k: host(v) for k, v in allocator.triplet_scores().items()}
    return None


def run_adalora():
    model, layers = tiny_model("adalora", **ADA)
    trainer = trainer_for(model, ADA["total_step"])
    oracle = naive.NaiveAdaLoraAllocator([(n, ADA["r"], ADA["target_r"]) for n, _ in layers],
                                         ADA["tinit"], ADA["tfinal"], ADA["total_step"],
                                         ADA["deltaT"])
    log, rows = [], []
    record_after_optimizer(trainer, layers, log)
    for t in range(ADA["total_step"]):
        trainer.train_step()
        expected = oracle.step(t, log[-1])
        scores = lowrank_scores(trainer) if t < ADA["total_step"] - ADA["tfinal"] else None
        rows.append((t, expected, oracle.scores() if scores is not None else None,
                     adalora.rank_pattern(model), {n: host(m.lora_E.data) for n, m in layers},
                     scores))
    return rows


@pytest.fixture(scope="module")
def adalora_run():
    return run_adalora()


def test_adalora_triplet_scores_match_the_oracle(adalora_run):
    compared = 0
    for t, _, expected, _, _, got in adalora_run:
        if got is None:
            continue
        for name, s in expected.items():
            np.testing.assert_allclose(got[name], s, rtol=1e-10, atol=1e-300,
                                       err_msg=f"triplet score of {name} at step {t}")
            compared += 1
        assert any(np.any(s > 0) for s in expected.values()), f"all scores zero at step {t}"
    assert compared > 0, "the allocator exposes no triplet scores"


def test_adalora_masks_match_the_oracle_every_step(adalora_run):
    masks = 0
    for t, expected, _, pattern, E, _ in adalora_run:
        if expected is None:
            continue
        masks += 1
        assert pattern == expected, f"rank pattern at step {t}"
        for name, keep in expected.items():
            dropped = ~np.array(keep)
            assert np.all(E[name][dropped] == 0.0), f"E of masked triplets of {name}, step {t}"
    assert masks >= 5   # steps 4, 6 (cubic budget), 7 (final), 8, 9 (frozen pattern)


def test_adalora_run_prunes_unevenly_to_the_target_budget(adalora_run):
    """The final pattern holds Σ target_r triplets, not target_r in every matrix: the scores,
    not the layer order, decided it (so a wrong score could not pass by symmetry)."""
    _, expected, _, pattern, _, _ = adalora_run[-1]
    kept = {name: sum(keep) for name, keep in pattern.items()}
    assert sum(kept.values()) == ADA["target_r"] * len(TARGETS)
    assert len(set(kept.values())) > 1, kept


# --- IncreLoRA --------------------------------------------------------------------------------

INC = dict(r=4, init_r=1, add_r=1, top_h=2, init_warmup=2, incre_interval=2, alpha=4.0)
INC_STEPS = 12


def record_layer_io(m, log):
    """Per backward: ``(ΔW before the step, ∂L/∂ΔW = Gᵀ x)`` from the layer's own input and
    output gradient (dropout is off, so the adapter sees x)."""
    forward, backward = m.forward, m.backward
    inputs = []

    def recording_forward(x, *args, **kwargs):
        inputs.append(host(x).reshape(-1, m.weight.shape[1]))
        return forward(x, *args, **kwargs)

    def recording_backward(dy, *args, **kwargs):
        A, E, B = host(m.lora_A.data), host(m.lora_E.data), host(m.lora_B.data)
        # official: α / (ranknum + 1e-5) with ranknum the active triplets, and W (loraW)
        # over every triplet, the reserves (E = 1e-5, advance learning) included
        c = m.config.alpha / (m.ranknum + 1e-5)
        delta = c * np.einsum("ik,k,kj->ij", B, E, A)             # c B diag(E) A
        G = host(dy).reshape(-1, m.weight.shape[0])
        log.append((delta, G.T @ inputs.pop()))
        return backward(dy, *args, **kwargs)
    m.forward, m.backward = recording_forward, recording_backward


def run_increlora():
    model, layers = tiny_model("increlora", **INC)
    names = [n for n, _ in layers]
    logs = {n: [] for n in names}
    for n, m in layers:
        record_layer_io(m, logs[n])
    trainer = trainer_for(model, INC_STEPS)
    hook = next(h for h in trainer.hooks if hasattr(h, "importance"))
    budget = INC["r"] * len(names)
    oracle = naive.NaiveIncreLoraScores(names)
    rows = []
    for _ in range(INC_STEPS):
        ranks_before = {n: m.ranknum for n, m in layers}
        trainer.train_step()
        done = trainer.step
        g = done - 1   # official update_and_increase(global_step): the 0-based step just run
        ranks = {n: m.ranknum for n, m in layers}
        total_before = sum(ranks_before.values())
        expected_growth = []
        if total_before < budget:
            oracle.update({n: naive.increlora_module_score(*logs[n][-1]) for n in names})
            if g > INC["init_warmup"] and g % INC["incre_interval"] == 0:
                expected_growth = naive.increlora_choose(oracle.importance(), names,
                                                         INC["top_h"], budget - total_before)
        grown = [n for n in names if ranks[n] > ranks_before[n]]
        rows.append((done, oracle.importance(), hook.importance(), expected_growth, grown))
    return rows


@pytest.fixture(scope="module")
def increlora_run():
    return run_increlora()


def test_increlora_module_importance_matches_the_oracle(increlora_run):
    for done, expected, got, want, _ in increlora_run:
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-300), (done, name)
        if want:   # a growth step: distinct importances, so the choice is the scores'
            assert len(set(expected.values())) == len(expected), f"tied importances at {done}"
            assert min(expected.values()) > 0.0


def test_increlora_grows_the_modules_the_oracle_chooses(increlora_run):
    growths = [(done, want, grown) for done, _, _, want, grown in increlora_run if want]
    assert [done for done, _, _ in growths] == [5, 7, 9, 11]   # g = 4, 6, 8, 10
    for done, want, grown in growths:
        assert grown == want, f"after step {done}: grew {grown}, the oracle chose {want}"
    order = [n for n, _ in lr.adapters.adapted_modules(tiny_model("increlora", **INC)[0])]
    assert any(want != order[:INC["top_h"]] for _, want, _ in growths), \
        "every choice is the first top_h modules: the test could not tell scores from order"
