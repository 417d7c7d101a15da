"""``lr.from_pretrained`` against transformers on tiny random models saved with
``save_pretrained``: GPT-2 logits and BERT hidden states and every parameter gradient, float64
(< 1e-9 relative) and float32 (< 1e-4 against the float64 reference); sharded files; the
registry round trip.

Gradients are compared through the key map itself: each torch gradient goes through the same
transform (transpose, q/k/v rows) as its weight, so the check covers the map too.
"""
import json

import numpy as np
import pytest

import lowrank as lr
from lowrank import backend, models

from tests.conftest import BACKEND_NAMES
from tests.helpers.common import rel_err, to_host

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

F64_TOL, F32_TOL = 1e-9, 1e-4
GPT2_TINY = dict(vocab_size=61, n_positions=12, n_embd=16, n_layer=2, n_head=4,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
BERT_TINY = dict(vocab_size=53, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=24, max_position_embeddings=16, type_vocab_size=2,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _randomize_(module, seed):
    """LayerNorm weights and biases away from 1/0 so their gradients are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "ln" in name or "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def save_gpt2(path, tie=True, **save_kwargs):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**GPT2_TINY, tie_word_embeddings=tie)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    _randomize_(model, 1)
    model.save_pretrained(path, **save_kwargs)
    return transformers.GPT2LMHeadModel.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float64).eval()


def save_bert(path, pooler=True, **save_kwargs):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**BERT_TINY)
    model = transformers.BertModel(cfg, add_pooling_layer=pooler).double().eval()
    _randomize_(model, 2)
    model.save_pretrained(path, **save_kwargs)
    return transformers.BertModel.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float64,
        add_pooling_layer=pooler).eval()


def torch_grads(model, prefix=""):
    return {n[len(prefix):] if n.startswith(prefix) else n: p.grad.numpy()
            for n, p in model.named_parameters()}


def grad_errors(model, ref_grads, entry):
    """Relative error of each lowrank gradient against the mapped torch gradient.

    The key bias's gradient is zero in exact arithmetic (adding q·b_k to every score of a row
    leaves the softmax unchanged), so both sides are rounding noise: it is measured against
    the scale of its weight's gradient instead."""
    params, key_map = dict(model.named_parameters()), entry.key_map(model)
    expected = {name: ref_grads[foreign] if transform is None else transform(ref_grads[foreign])
                for name, (foreign, transform) in key_map.items()}
    errs = {}
    for name, want in expected.items():
        got = to_host(params[name].grad)
        if name.endswith(("attn.k.bias", "self.key.bias")):
            scale = np.linalg.norm(expected[name[:-len("bias")] + "weight"])
            assert np.linalg.norm(want) < 1e-6 * scale     # zero up to rounding
            errs[name] = float(np.linalg.norm(got - want) / scale)
        else:
            errs[name] = rel_err(got, want)
    return errs


def bert_batch(rng):
    ids = rng.integers(1, BERT_TINY["vocab_size"], (3, 7))
    mask = np.ones((3, 7), dtype=np.int64)
    mask[1, 4:] = 0                       # a padded row
    mask[2, 6:] = 0
    ids[mask == 0] = 0
    types = np.zeros((3, 7), dtype=np.int64)
    types[0, 3:] = 1                      # a sentence pair
    types[2, 2:6] = 1
    return ids, mask, types


# --- GPT-2 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_logits_and_every_gradient_match_transformers(tmp_path, rng, tie):
    ref = save_gpt2(tmp_path, tie)
    idx = rng.integers(0, GPT2_TINY["vocab_size"], (2, 9))
    R = rng.standard_normal((2, 9, GPT2_TINY["vocab_size"]))
    logits_ref = ref(torch.tensor(idx)).logits
    (logits_ref * torch.tensor(R)).sum().backward()
    grads = torch_grads(ref, "transformer.")
    entry = models.entry("gpt2")
    for dtype, tol in (("float64", F64_TOL), ("float32", F32_TOL)):
        model = lr.from_pretrained(tmp_path, dtype=dtype)
        assert isinstance(model, lr.GPT) and model.config.tie_embeddings is tie
        model.zero_grad()
        logits, cache = model.forward(idx)
        err = rel_err(logits, logits_ref.detach().numpy())
        assert err < tol, (dtype, err)
        model.backward(backend.asarray(R, dtype=dtype), cache)
        errs = grad_errors(model, grads, entry)
        assert len(errs) == len(list(model.named_parameters()))
        worst = max(errs, key=errs.get)
        assert errs[worst] < tol, (dtype, worst, errs[worst])


def test_gpt2_config_translated(tmp_path):
    save_gpt2(tmp_path)
    cfg = lr.from_pretrained(tmp_path, dtype="float64").config
    assert (cfg.vocab_size, cfg.context, cfg.n_layer, cfg.n_head, cfg.d_model) == (61, 12, 2, 4, 16)
    assert cfg.layer_norm_eps == 1e-5


# --- BERT ----------------------------------------------------------------------------------------

def bert_reference(ref, ids, mask, types, R, R_pool):
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              token_type_ids=torch.tensor(types))
    loss = (out.last_hidden_state * torch.tensor(R)).sum()
    if R_pool is not None:
        loss = loss + (out.pooler_output * torch.tensor(R_pool)).sum()
    loss.backward()
    return out, torch_grads(ref)


@pytest.mark.parametrize("pooler", [True, False])
def test_bert_hidden_state_and_every_gradient_match_transformers(tmp_path, rng, pooler):
    ref = save_bert(tmp_path, pooler)
    ids, mask, types = bert_batch(rng)
    R = rng.standard_normal((3, 7, 16))
    R_pool = rng.standard_normal((3, 16)) if pooler else None
    out, grads = bert_reference(ref, ids, mask, types, R, R_pool)
    entry = models.entry("bert")
    for dtype, tol in (("float64", F64_TOL), ("float32", F32_TOL)):
        model = lr.from_pretrained(tmp_path, dtype=dtype)
        assert isinstance(model, lr.models.Bert) and model.config.pooler is pooler
        model.pack_tokens = False   # padded rows too, as transformers computes them
        model.zero_grad()
        hidden, cache = model.forward(ids, attention_mask=mask, token_type_ids=types)
        err = rel_err(hidden, out.last_hidden_state.detach().numpy())
        assert err < tol, (dtype, err)
        dhidden = backend.asarray(R, dtype=dtype)
        if pooler:
            pooled, c_pool = model.pool(hidden)
            assert rel_err(pooled, out.pooler_output.detach().numpy()) < tol
            # a new array: asarray may hand back R itself, which the float32 pass reuses
            dhidden = dhidden + model.pool_backward(backend.asarray(R_pool, dtype=dtype), c_pool)
        model.backward(dhidden, cache)
        errs = grad_errors(model, grads, entry)
        assert len(errs) == len(list(model.named_parameters())) == len(grads)
        worst = max(errs, key=errs.get)
        assert errs[worst] < tol, (dtype, worst, errs[worst])


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_bert_runs_on_every_backend(tmp_path, rng, name):
    save_bert(tmp_path)
    ids, mask, types = bert_batch(rng)
    ref = lr.from_pretrained(tmp_path, dtype="float64")
    model = lr.from_pretrained(tmp_path, dtype="float64", backend=name)
    xp = backend.namespace(name)
    ref.zero_grad()
    hidden_ref, cache_ref = ref.forward(ids, attention_mask=mask, token_type_ids=types)
    ref.backward(np.ones_like(hidden_ref), cache_ref)
    on = [backend.asarray(a, xp=xp) for a in (ids, mask, types)]
    model.zero_grad()
    hidden, cache = model.forward(on[0], attention_mask=on[1], token_type_ids=on[2])
    model.backward(xp.ones_like(hidden), cache)
    assert rel_err(hidden, hidden_ref) < 1e-12
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert backend.backend_of(p.grad) == name
        assert np.linalg.norm(to_host(p.grad) - to_host(q.grad)) <= \
            1e-12 * max(np.linalg.norm(to_host(q.grad)), 1.0), n


def test_bert_prefixed_keys_load(tmp_path):
    """Task models save ``bert.``-prefixed keys; the prefix is dropped."""
    save_bert(tmp_path / "plain")
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(tmp_path / "plain" / "model.safetensors"))
    (tmp_path / "prefixed").mkdir()
    save_file({f"bert.{k}": v for k, v in tensors.items()},
              str(tmp_path / "prefixed" / "model.safetensors"))
    (tmp_path / "prefixed" / "config.json").write_text(
        (tmp_path / "plain" / "config.json").read_text())
    a = lr.from_pretrained(tmp_path / "plain", dtype="float64")
    b = lr.from_pretrained(tmp_path / "prefixed", dtype="float64")
    for (n, p), (m, q) in zip(a.named_parameters(), b.named_parameters()):
        assert n == m and np.array_equal(to_host(p.data), to_host(q.data))


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_sharded_checkpoint_loads_like_one_file(tmp_path, kind):
    save = save_gpt2 if kind == "gpt2" else save_bert
    save(tmp_path / "one")
    save(tmp_path / "sharded", max_shard_size="4KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a = lr.from_pretrained(tmp_path / "one", dtype="float64")
    b = lr.from_pretrained(tmp_path / "sharded", dtype="float64")
    for (n, p), (m, q) in zip(a.named_parameters(), b.named_parameters()):
        assert n == m and np.array_equal(to_host(p.data), to_host(q.data))


def test_bert_saved_by_lowrank_loads_through_the_registry(tmp_path):
    save_bert(tmp_path / "hf")
    model = lr.from_pretrained(tmp_path / "hf", dtype="float64")
    lr.save(model, tmp_path / "mine")
    for loaded in (lr.load(tmp_path / "mine"),
                   lr.from_pretrained(tmp_path / "mine", dtype="float64")):
        assert isinstance(loaded, lr.models.Bert) and loaded.config == model.config
        for (n, p), (m, q) in zip(model.named_parameters(), loaded.named_parameters()):
            assert n == m and np.array_equal(to_host(p.data), to_host(q.data))
    as32 = lr.from_pretrained(tmp_path / "mine", dtype="float32")
    assert all(p.dtype == np.float32 for p in as32.parameters())
