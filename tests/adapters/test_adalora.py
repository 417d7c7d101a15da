"""The ``adalora`` variant (docs/variants.md#adalora): gradients, the orthogonality regulariser,
the budget schedule, masking to the target budget under the Trainer, the by-hand error,
save/load with the rank pattern, exact resume, the report, bad inputs. Run with ``-s`` for the
errors."""
import functools
import json
import types

import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.formats import checkpoint
from lowrank.files.storage import read_safetensors
from lowrank.app import cli, workflows as wf
from lowrank.adapters import adalora
from lowrank.adapters._adalora_allocator import budget_schedule, orth_regularizer
from lowrank.models import GPT, GPTConfig
from lowrank.training.trainer import Trainer, TrainConfig
from reference.finite_diff import numerical_gradient

from tests.helpers.common import (FakeData, error_log, gradient_errors, make_layer, perturb, pretrain_tiny_base,
                      problem, rel_err, to_host)

M, N, R, ROWS = 7, 5, 3, 4
TINY = GPTConfig(vocab_size=64, context=8, n_layer=2, n_head=2, d_model=16)
TARGETS = ["q", "k", "v", "o", "fc1", "fc2"]
ERRORS, _report_errors = error_log("adalora")
record = ERRORS.check
make = functools.partial(make_layer, variant="adalora", shape=(M, N), r=R, alpha=3.0)


# --- config ---------------------------------------------------------------------------------

def test_config_defaults_follow_peft_and_r_is_init_r():
    c = lr.adapters.config("adalora")
    assert (c.r, c.init_r, c.target_r, c.tinit, c.tfinal, c.deltaT) == (12, 12, 8, 0, 0, 1)
    assert (c.beta1, c.beta2, c.orth_reg_weight, c.total_step, c.orth_squared) == \
        (0.85, 0.85, 0.5, None, False)
    c = lr.adapters.config("adalora", r=2, alpha=3.0)
    assert (c.r, c.init_r, c.target_r) == (2, 2, 1)
    c = lr.adapters.config("adalora", r=8, init_r=6, target_r=4)      # the CLI always sends r
    assert (c.r, c.init_r, c.target_r) == (6, 6, 4)
    assert lr.adapters.config_from_dict(c.to_dict()) == c


@pytest.mark.parametrize("fields,message", [
    (dict(init_r=4, target_r=5), "^target_r must be <= init_r"),
    (dict(target_r=0), "^target_r must be an integer"),
    (dict(init_r=0), "^init_r must be an integer"),
    (dict(tinit=5, tfinal=5, total_step=10), "^tinit \\+ tfinal must be < total_step"),
    (dict(tinit=6, tfinal=5, total_step=10), "^tinit \\+ tfinal must be < total_step"),
    (dict(tinit=-1), "^tinit must be"), (dict(tfinal=1.5), "^tfinal must be"),
    (dict(deltaT=0), "^deltaT must be"), (dict(total_step=0), "^total_step must be"),
    (dict(beta1=1.0), "^beta1 must be in"), (dict(beta2=0.0), "^beta2 must be in"),
    (dict(orth_reg_weight=-0.1), "^orth_reg_weight must be"),
    (dict(orth_squared="yes"), "^orth_squared must be a bool"),
])
def test_bad_config_raises_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        lr.adapters.config("adalora", **fields)


def test_rank_above_min_dim_raises(xp):
    with pytest.raises(ValueError, match=r"^r must be an integer in 1\.\.min\(m, n\) = 1\.\.5"):
        make(xp, r=6)
    with pytest.raises(ValueError, match=r"^r must be an integer in 1\.\.min\(m, n\) = 1\.\.5"):
        make(xp, init_r=6, target_r=2)


def test_total_step_from_the_trainer_is_validated():
    model = GPT(TINY, seed=0, dtype="float64")
    lr.adapters.inject(model, lr.adapters.config("adalora", r=2, tinit=2, tfinal=1), ["q"])
    trainer = Trainer(model, FakeData(TINY), TrainConfig(steps=3, batch_size=2))
    with pytest.raises(ValueError, match="^tinit \\+ tfinal must be < total_step.*trainer's"):
        trainer.train_step()


# --- the layer --------------------------------------------------------------------------------

def test_init_is_peft_and_output_is_base(xp):
    layer, W0, b0 = make(xp, r=4, init_r=4, alpha=8.0)
    assert [n for n, _ in layer.named_parameters(trainable_only=True)] == \
        ["lora_A", "lora_E", "lora_B"]
    assert layer.lora_A.shape == (4, N) and layer.lora_E.shape == (4,)
    assert layer.lora_B.shape == (M, 4)
    assert float(abs(layer.lora_E.data).max()) == 0.0
    assert 0.005 < float(to_host(layer.lora_A.data).std()) < 0.05
    assert layer.scaling == 8.0 / (4 + 1e-5)              # PEFT: alpha / (ranknum + 1e-5)
    x = xp.asarray(np.random.default_rng(0).standard_normal((ROWS, N)))
    assert rel_err(layer.forward(x)[0], x @ W0.T + b0) == 0.0


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout-mask"])
def test_gradients_match_finite_differences(xp, with_mask):
    layer, _, _ = make(xp, dropout=0.3 if with_mask else 0.0)
    perturb(layer, xp)
    x, G, mask = problem(xp, (M, N), (2, ROWS), dropout=0.3 if with_mask else 0.0)
    for name, err in gradient_errors(layer, x, G, mask).items():
        record(f"{name} {'dropout' if with_mask else 'plain'}", err)


@pytest.mark.parametrize("squared", [False, True], ids=["unsquared", "squared"])
def test_regulariser_value_and_gradient(xp, squared):
    layers = [make(xp, seed=s)[0] for s in (0, 1)]
    for i, layer in enumerate(layers):
        perturb(layer, xp, seed=10 + i)
        layer.zero_grad()
    weight = 0.7
    value = orth_regularizer(layers, weight, squared)
    # the value, from its definition on the host
    terms = []
    for layer in layers:
        A, B = to_host(layer.lora_A.data), to_host(layer.lora_B.data)
        for Mx in (A @ A.T - np.eye(R), B.T @ B - np.eye(R)):
            norm = np.linalg.norm(Mx)
            terms.append(norm ** 2 if squared else norm)
    assert abs(value - weight * np.mean(terms)) < 1e-12 * abs(value)
    analytic = {(i, n): layer_p.grad.copy() for i, layer in enumerate(layers)
                for n, layer_p in (("A", layer.lora_A), ("B", layer.lora_B))}
    assert float(abs(layers[0].lora_E.grad).max()) == 0.0
    for (i, name), grad in analytic.items():
        array = (layers[i].lora_A if name == "A" else layers[i].lora_B).data
        numeric = numerical_gradient(lambda: orth_regularizer(layers, weight, squared), array)
        record(f"regulariser {'squared' if squared else 'unsquared'} d{name}",
               rel_err(grad, numeric))


def test_regulariser_weight_zero_is_free(xp):
    layer = make(xp)[0]
    layer.zero_grad()
    assert orth_regularizer([layer], 0.0) == 0.0
    assert float(abs(layer.lora_A.grad).max()) == 0.0


def test_driving_by_hand_past_total_step_raises(xp):
    layer, _, _ = make(xp, total_step=3, tinit=0, tfinal=1)
    x = xp.asarray(np.ones((ROWS, N)))
    G = xp.ones((ROWS, M))

    def step(accumulate=1):
        layer.zero_grad()
        for _ in range(accumulate):
            layer.backward(G, layer.forward(x)[1])
    for _ in range(3):
        step(accumulate=2)                   # micro-batches of one step count once
    layer.eval()
    layer.backward(G, layer.forward(x)[1])   # evaluation is not training
    layer.train()
    with pytest.raises(RuntimeError, match="total_step=3 steps without its rank allocator"):
        step()
    # with the allocator after every step, no limit
    layer2, _, _ = make(xp, total_step=3, tinit=0, tfinal=1)
    hook = layer2.step_hook(layer2)
    for t in range(6):
        layer2.zero_grad()
        layer2.backward(G, layer2.forward(x)[1])
        trainer = types.SimpleNamespace(step=t, config=types.SimpleNamespace(steps=99))
        hook.extra_loss(trainer)
        hook.after_step(trainer)
    assert hook.allocator.total_step == 3 and hook.allocator.final_pattern is not None


# --- the schedule ------------------------------------------------------------------------------

def test_budget_schedule_values():
    # b0 = 24, bT = 8, tinit = 2, tfinal = 3, T = 12, ΔT = 2: period 7, (1 - k/7)³·16 + 8
    got = [budget_schedule(t, 24, 8, 2, 3, 12, 2) for t in range(13)]
    assert got == [(24, False), (24, False), (24, False), (18, False), (13, True), (10, False),
                   (9, True), (8, False), (8, True), (8, False), (8, True), (8, True), (8, True)]
    for t in range(3, 10):   # the cubic in closed form
        assert got[t][0] == int(16 * (1 - (t - 2) / 7) ** 3 + 8)


@pytest.fixture(scope="module")
def trained(xp):
    """A tiny GPT fine-tuned with AdaLoRA by the Trainer: (model, trainer, budgets, patterns)."""
    model = GPT(TINY, seed=0, dtype="float64", xp=xp)
    cfg = lr.adapters.config("adalora", init_r=4, target_r=2, alpha=8.0, tinit=3, tfinal=5,
                             deltaT=2, dropout=0.1)
    lr.adapters.inject(model, cfg, TARGETS, seed=0)
    trainer = Trainer(model, FakeData(TINY), TrainConfig(steps=20, batch_size=4, lr=2e-2, warmup=2))
    budgets, patterns = [], []

    def on_step(tr, rec):
        budgets.append(tr.hooks[0].allocator.budget)
        patterns.append(adalora.rank_pattern(tr.model))
    trainer.fit(on_step=on_step, progress=False)
    return model, trainer, budgets, patterns


def test_trainer_masks_to_exactly_the_target_budget(trained):
    model, trainer, budgets, patterns = trained
    layers = [m for _, m in lr.adapters.adapted_modules(model)]
    assert len(layers) == 12 and len(trainer.hooks) == 1
    b0, bT = 12 * 4, 12 * 2
    expected = [budget_schedule(t, b0, bT, 3, 5, 20, 2)[0] for t in range(20)]
    assert budgets == expected and budgets[0] == b0 and budgets[-1] == bT
    for t, (budget, pattern) in enumerate(zip(budgets, patterns)):
        active = sum(sum(p) for p in pattern.values())
        if t >= 15 or (t > 3 and t % 2 == 0):          # a mask step: the budget, exactly
            assert active == budget, t
    assert sum(adalora.realised_ranks(model).values()) == bT
    assert all(p == patterns[15] for p in patterns[15:])          # frozen after T - tfinal
    for layer in layers:
        E = to_host(layer.lora_E.data)
        assert np.all(E[~np.array(layer.rank_pattern)] == 0.0)
        assert np.all(E[np.array(layer.rank_pattern)] != 0.0)
    ranks = set(adalora.realised_ranks(model).values())
    print(f"\nfinal ranks: {adalora.realised_ranks(model)}")
    assert len(ranks) > 1, "the allocation stayed uniform"


def test_report_and_heatmap(trained, tmp_path):
    model = trained[0]
    lines = adalora.AdaLoraLinear.report(model, tmp_path)
    assert lines[0].startswith("AdaLoRA final ranks: 24 of 48 triplets active")
    assert lines[1].split()[2:] == TARGETS
    assert [line.split()[0] for line in lines[2:4]] == ["blocks.0", "blocks.1"]
    assert (tmp_path / "adalora_ranks.png").stat().st_size > 5_000
    module = model.blocks[0].attn.q
    assert lines.facts["blocks.0.attn.q"] == {"rank": module.realised_rank, "init_r": 4, "target_r": 2}
    assert wf.variant_report(model, tmp_path) == lines


def test_save_load_round_trip_with_the_pattern(trained, tmp_path, xp):
    model = trained[0]
    checkpoint.save_adapter(model, tmp_path)
    info = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = read_safetensors(tmp_path / "adapter_model.safetensors")
    for name, m in lr.adapters.adapted_modules(model):
        extra = info["modules"][name]["extra"]
        assert extra["rank_pattern"] == m.rank_pattern and extra["rank"] == m.realised_rank
        assert tensors[f"{name}.lora_A.weight"].shape == (m.realised_rank, m.in_features)
        assert tensors[f"{name}.lora_B.weight"].shape == (m.out_features, m.realised_rank)
        assert tensors[f"{name}.lora_E"].shape == (m.realised_rank,)
    fresh = GPT(TINY, seed=0, dtype="float64", xp=xp)
    lr.adapters.inject(fresh, lr.adapters.config_from_dict(info["config"]), info["targets"])
    checkpoint.load_adapter(fresh, tmp_path)
    assert adalora.rank_pattern(fresh) == adalora.rank_pattern(model)
    idx = xp.asarray(np.arange(16).reshape(2, 8) % TINY.vocab_size)
    model.eval(), fresh.eval()
    assert float(abs(fresh.forward(idx)[0] - model.forward(idx)[0]).max()) == 0.0
    model.train()
    # a file of another init_r is refused before anything is assigned
    other = GPT(TINY, seed=0, dtype="float64", xp=xp)
    lr.adapters.inject(other, lr.adapters.config("adalora", init_r=3, target_r=2), TARGETS)
    with pytest.raises(ValueError, match="init_r=4 triplets, this layer has 3"):
        checkpoint.load_adapter(other, tmp_path)


# --- end to end: resume and the CLI ------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("adalora")
    pretrain_tiny_base(root, lr=1e-2, warmup=2)
    return root


def test_resume_is_exact_across_masks(base_dir, tmp_path):
    data = wf.DataSpec([str(base_dir / "corpus.txt")], val_fraction=0.2)
    options = {"init_r": 4, "target_r": 2, "alpha": 8.0, "tinit": 2, "tfinal": 4,
               "total_step": 12, "deltaT": 1, "dropout": 0.1}

    def run(out, steps, resume=False):   # warm-up longer than the run: lr independent of steps
        return wf.finetune(out, base_dir / "base", "adalora", ["q", "fc1"], options, data,
                           TrainConfig(steps=steps, batch_size=4, lr=2e-2, warmup=20),
                           resume=resume, progress=False)
    straight = run(tmp_path / "one", 12)
    run(tmp_path / "two", 7)                 # stops mid-pruning, with masked triplets saved
    assert json.loads((tmp_path / "two" / "adapter_config.json").read_text())["modules"][
        "blocks.0.attn.q"]["extra"]["rank"] < 4
    resumed = run(tmp_path / "two", 12, resume=True)
    for (name, p), (_, q) in zip(straight.model.named_parameters(),
                                 resumed.model.named_parameters()):
        assert np.array_equal(backend.to_numpy(p.data), backend.to_numpy(q.data)), name
    a, _ = wf.load_finetuned(base_dir / "base", tmp_path / "one")
    assert adalora.rank_pattern(a) == adalora.rank_pattern(straight.model)
    assert sum(adalora.realised_ranks(a).values()) == 2 * 2


def test_cli_finetune_prints_the_ranks(base_dir, tmp_path, capsys):
    assert cli.main(["finetune", "--base", str(base_dir / "base"), "--out", str(tmp_path / "ft"),
                     "--variant", "adalora", "--init-r", "4", "--target-r", "2", "--tinit", "1",
                     "--tfinal", "2", "--steps", "6", "--batch-size", "2", "--no-progress",
                     "--corpus", str(base_dir / "corpus.txt")]) == 0
    out = capsys.readouterr().out
    assert "AdaLoRA final ranks: 12 of 24 triplets active" in out
    assert (tmp_path / "ft" / "adalora_ranks.png").exists()
