"""Generation with a KV cache (docs/performance.md#kv-cache): the cached attention's rows equal full
causal attention's, cached logits equal the full forward's, and greedy output is identical
with and without the cache, past the context too, for lowrank's GPT (plain and with a LoRA
adapter) and for an imported GPT-2 (where it also equals transformers' greedy ``generate``).
"""
import numpy as np
import pytest

import lowrank as lr
from lowrank import backend
from lowrank.models.generate import generate, sample_next
from lowrank.ops.attention import attention_cached, attention_forward

from tests.helpers.common import rel_err, to_host

SMALL = lr.GPTConfig(vocab_size=37, context=16, n_layer=2, n_head=4, d_model=32)


def _model(xp, dtype="float64", seed=3):
    model = lr.GPT(SMALL, seed=seed, dtype=dtype, xp=xp)
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():   # larger weights: logits far from ties
        p.data += backend.asarray(0.2 * rng.standard_normal(p.shape), dtype=dtype, xp=xp)
    return model


def test_cached_attention_rows_equal_full_attention(xp):
    rng = np.random.default_rng(0)
    B, T, d, H, past = 2, 7, 8, 2, 4
    q, k, v = (backend.asarray(rng.standard_normal((B, T, d)), xp=xp) for _ in range(3))
    full, _ = attention_forward(q, k, v, H, causal=True)
    kv = tuple(xp.zeros((B, H, 10, d // H)) for _ in range(2))
    head = attention_cached(q[:, :past], k[:, :past], v[:, :past], H, kv, 0)   # prefill
    rows = [attention_cached(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], H, kv, t)
            for t in range(past, T)]                                           # one at a time
    got = np.concatenate([to_host(head)] + [to_host(r) for r in rows], axis=1)
    assert rel_err(got, to_host(full)) < 1e-13
    with pytest.raises(ValueError, match="do not fit"):
        attention_cached(q, k, v, H, kv, 5)


def test_cached_logits_equal_the_full_forward(xp):
    model = _model(xp)
    idx = backend.asarray(np.random.default_rng(1).integers(0, 37, (2, 11)), xp=xp)
    full, _ = model.forward(idx)
    kv = model.new_kv_cache(2)
    first = model.forward_cached(idx[:, :6], kv, 0)
    rest = [model.forward_cached(idx[:, t:t + 1], kv, t) for t in range(6, 11)]
    got = np.concatenate([to_host(first)] + [to_host(r) for r in rest], axis=1)
    assert rel_err(got, to_host(full)) < 1e-12
    with pytest.raises(ValueError, match="exceed the context"):
        model.forward_cached(idx[:, :1], kv, 16)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_greedy_is_identical_with_and_without_the_cache(xp, dtype):
    model = _model(xp, dtype)
    prompt = [5, 1, 30, 2]
    cached = generate(model, prompt, 25, use_cache=True)     # 29 > context 16: window slides
    plain = generate(model, prompt, 25, use_cache=False)
    assert cached == plain and len(cached) == 29 and cached[:4] == prompt
    assert len(set(cached[4:])) > 1                          # not a constant stream
    assert model.training                                    # mode restored


def test_greedy_is_identical_with_a_lora_adapter(xp):
    model = _model(xp)
    model.freeze()
    lr.adapters.inject(model, lr.adapters.config("lora", r=4, alpha=8, init="gaussian"),
                       ["q", "v", "fc1"])
    for name, p in model.named_parameters(trainable_only=True):   # B = 0 at init: move it
        p.data += backend.asarray(0.3 * np.ones(p.shape), xp=xp)
    assert generate(model, [3, 4], 14) == generate(model, [3, 4], 14, use_cache=False)


def test_sampling_draws_from_the_top_k():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    draws = {sample_next(logits, 1.0, 2, rng) for _ in range(200)}
    assert draws == {1, 2}
    assert sample_next(logits, 0.0, None, rng) == 1


def test_generate_validates_its_arguments():
    model = lr.GPT(SMALL)
    with pytest.raises(ValueError, match="ids"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1], -1)


def test_imported_gpt2_greedy_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=24, n_embd=32, n_layer=2,
                                  n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ref = transformers.GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(8.0)                                      # far from ties
    ref.save_pretrained(tmp_path)
    model = lr.from_pretrained(tmp_path, dtype="float64")
    prompt = [7, 3, 11]
    cached = generate(model, prompt, 15)
    assert cached == generate(model, prompt, 15, use_cache=False)
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=15, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
    assert cached == out[0].tolist()


@pytest.mark.parametrize("pre_ln", [True, False])
def test_block_cached_rows_equal_its_forward_for_either_layernorm_order(xp, pre_ln):
    model = _model(xp)
    ref = model.blocks[0]
    block = lr.models.GPTBlock(ref.ln1, ref.attn, ref.ln2, ref.mlp, pre_ln=pre_ln)
    x = backend.asarray(np.random.default_rng(2).standard_normal((2, 9, 32)), xp=xp)
    full, _ = block.forward(x)
    kv = model.new_kv_cache(2)[0]
    rows = [block.forward_cached(x[:, :5], kv, 0)] + \
        [block.forward_cached(x[:, t:t + 1], kv, t) for t in range(5, 9)]
    got = np.concatenate([to_host(r) for r in rows], axis=1)
    assert rel_err(got, to_host(full)) < 1e-12
    bidirectional = lr.models.GPTBlock(ref.ln1, ref.attn, ref.ln2, ref.mlp, causal=False)
    with pytest.raises(ValueError, match="causal"):
        bidirectional.forward_cached(x, kv, 0)
