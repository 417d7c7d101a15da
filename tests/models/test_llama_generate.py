"""Generation for the Llama family (docs/llama.md#generate): incremental decoding through the
KV cache gives the tokens of re-running the whole sequence, greedy matches transformers'
``generate``, the sampling filters are transformers' warpers, and stop ids end it."""
import numpy as np
import pytest

import lowrank as lr
from lowrank.models import decode
from lowrank.models.llama import Llama
from lowrank.models.llama_config import LlamaConfig

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)


def tiny(dtype="float64", **fields):
    model = Llama(LlamaConfig(**{**TINY, **fields}), seed=3, dtype=dtype)
    rng = np.random.default_rng(0)
    for p in model.parameters():     # larger weights than the init: varied greedy tokens
        p.data = (p.data + 0.3 * rng.standard_normal(p.shape)).astype(p.dtype)
    return model


def rerun_greedy(model, ids, n):
    """The reference: the whole sequence through ``forward`` for every new token."""
    ids = list(ids)
    for _ in range(n):
        logits, _ = model.forward(np.asarray([ids]))
        ids.append(int(np.argmax(logits[0, -1])))
    return ids


def test_greedy_through_the_cache_equals_rerunning_everything():
    model = tiny()
    out = decode.generate(model, [1, 7, 3], 12)
    assert out == rerun_greedy(model, [1, 7, 3], 12)
    assert len(set(out[3:])) > 2                      # a real sequence, not one token


def test_each_step_runs_one_position(monkeypatch):
    model = tiny()
    widths = []
    original = Llama.forward_cached

    def spy(self, ids, kv, past, *args, **kwargs):
        widths.append((ids.shape[1], past))
        return original(self, ids, kv, past, *args, **kwargs)
    monkeypatch.setattr(Llama, "forward_cached", spy)
    decode.generate(model, [4, 5, 6, 7], 5)
    assert widths == [(4, 0), (1, 4), (1, 5), (1, 6), (1, 7)]


def test_a_prompt_runs_the_head_on_its_last_position_only(monkeypatch):
    model = tiny()
    ids = np.asarray([[4, 5, 6, 7], [1, 2, 3, 9]])
    every = model.forward_cached(ids, model.new_kv_cache(2, 4), 0)             # (2, 4, V)
    rows = []
    original = Llama.head_forward
    monkeypatch.setattr(Llama, "head_forward",
                        lambda self, h: (rows.append(h.shape), original(self, h))[1])
    last = model.forward_cached(ids, model.new_kv_cache(2, 4), 0, last_only=True)
    assert rows == [(2, 1, TINY["hidden_size"])] and last.shape == (2, 1, TINY["vocab_size"])
    np.testing.assert_allclose(last[:, 0], every[:, -1], rtol=1e-12, atol=1e-12)


def test_stop_ids_end_generation():
    model = tiny()
    free = decode.generate(model, [2, 9], 10)
    stop = free[4]                                     # the third generated token
    out = decode.generate(model, [2, 9], 10, stop_ids=[stop, 10**6])
    assert out == free[:free.index(stop, 2) + 1]


def test_sampling_is_seeded_and_filters_apply():
    model = tiny()
    a = decode.generate(model, [1, 2], 8, temperature=1.0, top_k=5, top_p=0.9, rng=7)
    b = decode.generate(model, [1, 2], 8, temperature=1.0, top_k=5, top_p=0.9, rng=7)
    assert a == b
    assert decode.generate(model, [1, 2], 8, temperature=1.0, top_k=1, rng=3) == \
        decode.generate(model, [1, 2], 8)             # top-1 sampling is greedy


def test_top_k_top_p_probabilities():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = decode.next_token_probabilities(logits, 1.0, top_p=0.8)
    np.testing.assert_allclose(p, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0])
    p = decode.next_token_probabilities(logits, 1.0, top_k=2)
    np.testing.assert_allclose(p, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    assert decode.next_token_probabilities(logits, 1.0, top_p=0.01)[0] == 1.0


@pytest.mark.parametrize("fields,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=-1),
                                                             "max_new_tokens")])
def test_bad_options_are_refused(fields, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        decode.generate(model, [1], **{"max_new_tokens": 3, **fields})


def test_too_long_is_refused():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        decode.generate(tiny(), [1] * 30, 20)


def test_warpers_match_transformers():
    torch = pytest.importorskip("torch")
    gen = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(1)
    for temperature, top_k, top_p in [(0.7, None, 0.9), (1.3, 10, 0.5), (1.0, 3, None),
                                      (0.5, None, 0.3)]:
        logits = 3.0 * rng.standard_normal(40)
        warped = torch.tensor(logits)[None]
        warped = gen.TemperatureLogitsWarper(temperature)(None, warped)
        if top_k:
            warped = gen.TopKLogitsWarper(top_k)(None, warped)
        if top_p:
            warped = gen.TopPLogitsWarper(top_p)(None, warped)
        ref = warped.softmax(-1)[0].numpy()
        mine = decode.next_token_probabilities(logits, temperature, top_k, top_p)
        np.testing.assert_allclose(mine, ref, atol=1e-12)
        assert ((mine > 0) == (ref > 0)).all()


def test_greedy_matches_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.helpers.llama_oracle import load, tiny_checkpoint
    tiny_checkpoint(tmp_path, "llama", seed=5, num_attention_heads=4, num_key_value_heads=2)
    ref = load(tmp_path, "llama", "float32")
    ours = lr.from_pretrained(tmp_path, dtype="float32")
    for prompt in ([1, 2, 3], [40, 7], [9, 9, 9, 9, 1]):
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0].tolist()
        assert decode.generate(ours, prompt, 10) == theirs


def test_generation_on_every_backend(xp):
    """The cache path under numpy-strict (and CuPy): the same greedy tokens as NumPy."""
    host = tiny()
    model = Llama(LlamaConfig(**TINY), seed=3, dtype="float64", xp=xp)
    for (_, p), (_, q) in zip(model.named_parameters(), host.named_parameters()):
        p.data = xp.asarray(q.data)
    assert decode.generate(model, [5, 1], 6) == decode.generate(host, [5, 1], 6)


def test_greedy_batch_equals_each_prompt_alone():
    """Prompts of 1 to 9 tokens decoded together (left-padded, masked, positions per row)
    give each prompt's own greedy tokens; a row stops at a stop id while the others go on."""
    model = tiny()
    prompts = [[4, 5, 6, 7], [1], [9, 8, 7, 6, 5, 4, 3, 2, 1], [2, 2]]
    alone = [list(decode.stream(model, p, 10)) for p in prompts]
    assert decode.greedy_batch(model, prompts, 10) == alone
    stop = alone[2][3]                                   # the 4th token of the longest prompt
    cut = [a[:a.index(stop) + 1] if stop in a else a for a in alone]
    assert decode.greedy_batch(model, prompts, 10, stop_ids=[stop]) == cut
    assert any(len(c) < 10 for c in cut) and any(len(c) == 10 for c in cut)
    assert decode.greedy_batch(model, [], 5) == [] and decode.greedy_batch(model, [[1]], 0) == [[]]
    with pytest.raises(ValueError, match="at least one token"):
        decode.greedy_batch(model, [[1], []], 3)
