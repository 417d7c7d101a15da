"""Every registered adapter variant on a tiny Llama by PEFT's target names: inject, then the
gradient of every trainable parameter against finite differences of the whole model
(float64, rel < 1e-6), frozen weights without a gradient, and a few optimizer steps that
lower the loss."""
import numpy as np
import pytest

import lowrank as lr
from lowrank.models.llama import Llama
from lowrank.models.llama_config import LlamaConfig
from reference.finite_diff import numerical_gradient
from tests.helpers.common import rel_err, to_host

SIZES = dict(vocab_size=20, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
TARGETS = ["q_proj", "v_proj", "down_proj"]
EXTRA = {"rosa": dict(support="random", density=0.5),   # S is empty until a support exists
         "dora": dict(exact_norm_grad=True)}             # PEFT's default detaches the norm
IDS = np.array([[1, 4, 7, 2, 19], [3, 3, 0, 11, 5]])
MASK = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])


def adapted(variant, xp=None, seed=0):
    model = Llama(LlamaConfig(**SIZES, tie_word_embeddings=True), seed=seed, dtype="float64",
                  xp=xp)
    cfg = lr.adapters.config(variant, r=2, **EXTRA.get(variant, {}))
    names = lr.adapters.inject(model, cfg, TARGETS)
    rng = np.random.default_rng(seed + 1)
    for _, layer in lr.adapters.adapted_modules(model):   # off the init: no zero gradient
        for _, p in layer.named_parameters(trainable_only=True):
            p.data = p.data + model.xp.asarray(0.3 * rng.standard_normal(p.shape))
    return model, names


@pytest.mark.parametrize("variant", lr.adapters.available())
def test_variant_gradients_on_llama(variant):
    model, names = adapted(variant)
    assert len(names) == 3 * SIZES["num_hidden_layers"]
    assert all(n.split(".")[-1] in TARGETS for n in names)
    R = np.random.default_rng(2).standard_normal((2, 5, 20)) * MASK[:, :, None]

    def loss():
        logits, _ = model.forward(IDS, attention_mask=MASK)
        return float(np.sum(to_host(logits) * R))
    model.zero_grad()
    logits, cache = model.forward(IDS, attention_mask=MASK)
    model.backward(R, cache)
    trainable = dict(model.named_parameters(trainable_only=True))
    assert trainable
    for name, p in model.named_parameters():
        assert (p.grad is None) == (not p.trainable), name
    layer_prefix = names[-1] + "."                        # the last layer's adapter, whole
    checked = 0
    for name, p in trainable.items():
        if name.startswith(layer_prefix) and p.data.size <= 400:
            err = rel_err(p.grad, numerical_gradient(loss, p.data, 1e-6))
            assert err < 1e-6, (name, err)
            checked += 1
    assert checked


@pytest.mark.parametrize("variant", ["lora", "dora", "vera", "loha", "lokr", "adalora"])
def test_variant_trains_on_llama(variant):
    """Ten AdamW steps of next-token cross-entropy on one batch lower its loss."""
    model, _ = adapted(variant, seed=3)
    opt = lr.nn.optim.AdamW(list(model.named_parameters(trainable_only=True)), lr=1e-2,
                         weight_decay=0.0)
    targets = np.roll(IDS, -1, axis=1)
    losses = []
    for _ in range(10):
        model.zero_grad()
        logits, cache = model.forward(IDS)
        loss, c_ce = lr.ops.cross_entropy_forward(logits, targets)
        model.backward(lr.ops.cross_entropy_backward(c_ce, 1.0), cache)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1e-3, losses
