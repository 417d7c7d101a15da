"""lowrank's Llama, Qwen2 and Mistral against transformers' (tests/models/llama_oracle.py) on
tiny random checkpoints written with ``save_pretrained``: grouped-query attention with two
and more groups, tied and untied heads, every rope type lowrank builds; logits and the
gradient of every parameter, float64 within 1e-9 relative, float32 within 1e-4 of the float64
oracle; unpadded, left- and right-padded; the KV cache against the full forward and against
transformers' ``past_key_values``. Run with ``-s`` for the figures.
"""
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import lowrank as lr  # noqa: E402
from tests.helpers.common import error_log, rel_err, to_host  # noqa: E402

from tests.models.llama_oracle import (float64_oracle, load, logits_and_grads,  # noqa: E402
                                       tiny_checkpoint)

ERRORS, _report_errors = error_log("Llama family vs transformers (max relative error)")

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
CASES = {   # label: (family, transformers config fields)
    "llama-gqa2-untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-gqa3-tied-linear": ("llama", dict(num_attention_heads=6, num_key_value_heads=2,
                                             hidden_size=48, tie_word_embeddings=True,
                                             rope_scaling=dict(rope_type="linear", factor=2.5))),
    "llama-llama3-theta": ("llama", dict(rope_scaling=LLAMA3, rope_theta=500.0)),
    "qwen2-bias-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True)),
    "mistral-gqa4": ("mistral", dict(num_attention_heads=8, num_key_value_heads=2,
                                     head_dim=8, rope_theta=100000.0)),
}
PADDING = {"none": None,
           "left": np.array([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]),
           "right": np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]])}
TOL = {"float64": 1e-9, "float32": 1e-4}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_family")
    return {label: tiny_checkpoint(root / label, family, seed=i, **fields)
            for i, (label, (family, fields)) in enumerate(CASES.items())}


@pytest.fixture(scope="module")
def oracle(checkpoints):
    """float64 transformers models, built and run inside float64_oracle."""
    cache = {}

    def run(label, ids, mask, R):
        with float64_oracle():
            if label not in cache:
                cache[label] = load(checkpoints[label], CASES[label][0], "float64")
            return logits_and_grads(cache[label], ids, mask, R)
    return run


def problem(label, padding, vocab=48):
    rng = np.random.default_rng(zlib.crc32(f"{label} {padding}".encode()))   # fixed per case
    mask = PADDING[padding]
    ids = rng.integers(0, vocab, (2, 7))
    R = rng.standard_normal((2, 7, vocab))
    if mask is not None:
        R *= mask[:, :, None]            # the loss reads real positions only
    return ids, mask, R


def ours_logits_and_grads(model, ids, mask, R):
    model.zero_grad()
    xp = model.xp
    logits, cache = model.forward(xp.asarray(ids), None if mask is None else xp.asarray(mask))
    model.backward(xp.asarray(R, dtype=logits.dtype), cache)
    return to_host(logits), {n: to_host(p.grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("padding", list(PADDING))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("label", list(CASES))
def test_logits_and_every_gradient(checkpoints, oracle, label, dtype, padding):
    ids, mask, R = problem(label, padding)
    ref_logits, ref_grads = oracle(label, ids, mask, R)
    model = lr.from_pretrained(checkpoints[label], dtype=dtype)
    logits, grads = ours_logits_and_grads(model, ids, mask, R)
    real = slice(None) if mask is None else mask.astype(bool)
    assert set(grads) == set(ref_grads)                  # same parameters, same names
    worst = {"logits": rel_err(logits[real], ref_logits[real])}
    worst.update({n: rel_err(g, ref_grads[n]) for n, g in grads.items()})
    name = max(worst, key=worst.get)
    ERRORS.check(f"{label} {dtype} {padding}: logits", worst["logits"], TOL[dtype])
    ERRORS.check(f"{label} {dtype} {padding}: worst gradient",
                 max(v for k, v in worst.items() if k != "logits"), TOL[dtype])
    assert worst[name] < TOL[dtype], (name, worst[name])


@pytest.mark.parametrize("label", ["llama-gqa3-tied-linear", "qwen2-bias-tied",
                                   "llama-llama3-theta"])
def test_kv_cache_equals_full_and_transformers_past(checkpoints, label):
    """Prefill 4 positions, then one token at a time through the cache: each row equals the
    full forward's, and transformers' logits with ``past_key_values``."""
    ids = np.random.default_rng(3).integers(0, 48, (2, 8))
    model = lr.from_pretrained(checkpoints[label], dtype="float64")
    full, _ = model.forward(ids)
    kv = model.new_kv_cache(2, 8)
    rows = [model.forward_cached(ids[:, :4], kv, 0)]
    rows += [model.forward_cached(ids[:, t:t + 1], kv, t) for t in range(4, 8)]
    ERRORS.check(f"{label} float64: cached vs full", rel_err(np.concatenate(rows, 1), full),
                 1e-12)
    with float64_oracle():
        ref = load(checkpoints[label], CASES[label][0], "float64")
        with torch.no_grad():
            out = ref(torch.tensor(ids[:, :4]), use_cache=True)
            steps = [out.logits.numpy()]
            past = out.past_key_values
            for t in range(4, 8):
                out = ref(torch.tensor(ids[:, t:t + 1]), cache=past, use_cache=True)
                past = out.past_key_values
                steps.append(out.logits.numpy())
    ERRORS.check(f"{label} float64: cached vs transformers past_key_values",
                 rel_err(np.concatenate(rows, 1), np.concatenate(steps, 1)), 1e-9)
    assert kv[0][0].shape == (2, model.config.num_key_value_heads, 8, model.config.head_dim)


def test_kv_cache_with_left_padding_equals_transformers(checkpoints):
    """A left-padded batch decoded through the cache, positions counted from each row's
    first real token (as transformers' ``generate`` does): the real rows equal
    transformers' with the same attention mask, position ids and ``past_key_values``."""
    label = "llama-gqa2-untied"
    ids = np.random.default_rng(4).integers(0, 48, (2, 7))
    mask = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    model = lr.from_pretrained(checkpoints[label], dtype="float64")
    kv = model.new_kv_cache(2, 7)
    rows = [model.forward_cached(ids[:, :5], kv, 0, mask[:, :5], positions[:, :5])]
    rows += [model.forward_cached(ids[:, t:t + 1], kv, t, mask[:, :t + 1],
                                  positions[:, t:t + 1]) for t in (5, 6)]
    mine = np.concatenate(rows, 1)
    with float64_oracle():
        ref = load(checkpoints[label], "llama", "float64")
        with torch.no_grad():
            out = ref(torch.tensor(ids[:, :5]), attention_mask=torch.tensor(mask[:, :5]),
                      position_ids=torch.tensor(positions[:, :5]), use_cache=True)
            steps, past = [out.logits.numpy()], out.past_key_values
            for t in (5, 6):
                out = ref(torch.tensor(ids[:, t:t + 1]),
                          attention_mask=torch.tensor(mask[:, :t + 1]),
                          position_ids=torch.tensor(positions[:, t:t + 1]),
                          cache=past, use_cache=True)
                steps.append(out.logits.numpy())
                past = out.past_key_values
    real = mask.astype(bool)
    ERRORS.check("llama float64 left-padded: cached vs transformers past_key_values",
                 rel_err(mine[real], np.concatenate(steps, 1)[real]), 1e-9)


def test_rope_frequencies_are_transformers(checkpoints):
    """The inverse frequencies of every rope type: transformers' float32 values to float32
    rounding, and its own formulas run in float64 to 1e-15."""
    for label, (family, _) in CASES.items():
        model = lr.from_pretrained(checkpoints[label], dtype="float64")
        mine = to_host(model.rope_freq)
        theirs32 = load(checkpoints[label], family, "float32").model.rotary_emb.inv_freq
        with float64_oracle():
            theirs64 = load(checkpoints[label], family, "float64").model.rotary_emb.inv_freq
        assert rel_err(mine, theirs32.numpy()) < 1e-7, label
        assert rel_err(mine, theirs64.numpy()) < 1e-15, label


def test_peft_target_names_mean_the_same_modules(checkpoints):
    """``q_proj``/``v_proj`` and PEFT's ``all-linear`` (every Linear but the head) choose the
    same module names in lowrank and PEFT."""
    peft = pytest.importorskip("peft")
    for label in ("llama-gqa2-untied", "qwen2-bias-tied"):
        family = CASES[label][0]
        for targets in (["q_proj", "v_proj"], "all-linear"):
            hf = load(checkpoints[label], family, "float32")
            wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=targets))
            theirs = sorted(n.removeprefix("base_model.model.")
                            for n, m in wrapped.named_modules() if hasattr(m, "lora_A")
                            and not n.endswith(("lora_A", "lora_B")))
            model = lr.from_pretrained(checkpoints[label], dtype="float32")
            names = lr.adapters.inject(model, lr.adapters.config("lora", r=2), targets)
            assert sorted(names) == theirs, (label, targets)
