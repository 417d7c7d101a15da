"""LoRA+ (docs/variants.md#loraplus): B learns at ``loraplus_lr_ratio`` × A's learning rate.

With Adam the first update of every element is ``lr · g / (|g| + eps)`` ≈ ``lr · sign(g)``, so
the step of each B entry is λ times the step of each A entry, whatever their gradients."""
import json

import numpy as np
import pytest

import lowrank as lr
from lowrank.app.cli import main
from lowrank.models import GPT, GPTConfig
from lowrank.nn.optim import AdamW, loraplus_scales
from lowrank.training.trainer import TrainConfig, Trainer

from tests.helpers.common import FakeData, make_layer, perturb, pretrain_tiny_base, problem

TINY = GPTConfig(vocab_size=32, context=8, n_layer=1, n_head=2, d_model=16)


@pytest.mark.parametrize("ratio", [16.0, 4.0])
def test_first_adam_step_of_B_is_ratio_times_A_s(ratio):
    layer, _, _ = make_layer(np, "lora", (12, 10), r=3, alpha=6.0, bias="lora_only")
    perturb(layer, np)                      # B ≠ 0, so A has a gradient
    x, G, _ = problem(np, (12, 10), 8)
    layer.zero_grad()
    y, cache = layer.forward(x)
    layer.backward(G, cache)
    named = list(layer.named_parameters(trainable_only=True))
    scales = loraplus_scales(named, ratio, lr=1e-3)
    assert scales == {"bias": ratio, "lora_B": ratio}      # PEFT: lora_B and 1-D parameters
    opt = AdamW(named, lr=1e-3, weight_decay=0.0, eps=0.0)
    for name, factor in scales.items():
        opt.set_lr_scale(dict(named)[name], factor)
    before = {n: p.data.copy() for n, p in named}
    grads = {n: p.grad.copy() for n, p in named}
    opt.step()
    steps = {n: before[n] - p.data for n, p in named}
    np.testing.assert_allclose(steps["lora_A"], 1e-3 * np.sign(grads["lora_A"]), rtol=1e-12)
    np.testing.assert_allclose(steps["lora_B"], ratio * 1e-3 * np.sign(grads["lora_B"]),
                               rtol=1e-12)
    ratios = np.abs(steps["lora_B"]).mean() / np.abs(steps["lora_A"]).mean()
    assert abs(ratios - ratio) < 1e-9 * ratio


def test_trainer_groups_from_the_config():
    model = GPT(TINY, seed=0, dtype="float64")
    lr.adapters.inject(model, lr.adapters.config("lora", r=2), ["q", "fc1"])
    train = TrainConfig(steps=1, batch_size=2, loraplus_lr_ratio=16.0)
    trainer = Trainer(model, FakeData(TINY), train)
    scaled = trainer.optimizer.lr_scale
    assert scaled and all(v == 16.0 for v in scaled.values())
    assert {n for n in trainer.optimizer.params if "lora_B" in n} == set(scaled)
    plain = Trainer(GPT(TINY, seed=0, dtype="float64"), FakeData(TINY), TrainConfig(steps=1))
    assert plain.optimizer.lr_scale == {}


@pytest.mark.parametrize("value", [0.0, -2.0])
def test_invalid_ratio_raises_naming_the_field(value):
    with pytest.raises(ValueError, match="^loraplus_lr_ratio "):
        TrainConfig(loraplus_lr_ratio=value)


def test_cli_finetune_takes_the_ratio(tmp_path):
    data = pretrain_tiny_base(tmp_path)
    main(["finetune", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "ft"),
          "--variant", "lora", "--targets", "q", "--r", "2", "--steps", "2", "--batch-size", "4",
          "--corpus", *data.corpus, "--no-progress", "--loraplus-lr-ratio", "16"])
    run = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert run["train"]["loraplus_lr_ratio"] == 16.0


def test_demo_rows_include_the_new_variants_loraplus_and_qlora():
    from lowrank.app import demo
    labels = {label: (variant, options) for label, variant, options in demo.rows()}
    assert {"vera", "loha", "lokr"} <= set(labels)
    assert set(demo.RUN_OPTIONS) <= set(labels)   # every special run is a row the demo trains
    assert labels["lora+ (λ=16)"][0] == labels["qlora (nf4)"][0] == "lora"
