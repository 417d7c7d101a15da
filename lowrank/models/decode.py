"""Token-by-token generation through a KV cache for the Llama family (docs/llama.md#generate):
greedy, temperature, top-k, top-p, stopping at any of a set of ids (eos, end of turn).

The prompt runs once (the prefill, one ``forward_cached`` over all its positions), then each
new token runs alone through the cache: one position per layer per step. The cache is sized
for the prompt plus ``max_new_tokens`` (not the whole context), one key/value head per group.
Sampling follows transformers' warpers in its order: logits / temperature, then top-k, then
top-p (the smallest set of the most likely tokens whose probability reaches ``top_p``;
transformers drops tokens whose ascending cumulative probability is <= 1 - top_p).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..nn.validate import check_int, check_number


def _check(temperature, top_k, top_p, max_new_tokens) -> None:
    check_int("max_new_tokens", max_new_tokens, 0)
    check_number("temperature", temperature, 0.0)
    check_int("top_k", top_k, 1, optional=True)
    if top_p is not None:
        check_number("top_p", top_p, 0.0, 1.0, low_open=True)


def next_token_probabilities(logits, temperature: float, top_k=None, top_p=None) -> np.ndarray:
    """Host float64 ``(V,)`` probabilities of the next token from one row of logits, with
    temperature > 0, top-k and top-p applied (zero outside the kept set)."""
    last = np.asarray(logits, dtype=np.float64) / float(temperature)
    if top_k is not None and top_k < last.size:
        cutoff = np.partition(last, -top_k)[-top_k]
        last[last < cutoff] = -np.inf
    probs = np.exp(last - last.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(last, kind="stable")                 # ascending, as transformers
        drop = np.cumsum(probs[order]) <= 1.0 - top_p
        drop[-1] = False                                        # the most likely stays
        probs[order[drop]] = 0.0
        probs /= probs.sum()
    return probs


def sample(logits, temperature: float = 0.0, top_k=None, top_p=None, rng=None) -> int:
    """One token id from a host row of logits: the argmax at temperature 0 (the first of
    equal maxima, as torch), else a draw from ``rng`` (a numpy Generator)."""
    if temperature == 0:
        return int(np.argmax(np.asarray(logits)))
    probs = next_token_probabilities(logits, temperature, top_k, top_p)
    return int(rng.choice(probs.size, p=probs))


def stream(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None,
           stop_ids=(), rng=None):
    """Yield the generated ids one at a time (the stop id included, then it ends), at most
    ``max_new_tokens``. ``ids``: the prompt, a list of ints (at least one)."""
    _check(temperature, top_k, top_p, max_new_tokens)
    prompt = [check_int("token id", int(i), 0) for i in ids]
    if not prompt:
        raise ValueError("ids must hold at least one token (the prompt)")
    stop = {int(s) for s in stop_ids}
    rng = backend.host_rng(0 if rng is None else rng)
    length = len(prompt) + max_new_tokens
    if max_new_tokens and length - 1 > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")
    if max_new_tokens == 0:
        return
    was_training = getattr(model, "training", True)
    model.eval()
    xp = model.xp
    try:
        kv = model.new_kv_cache(1, length - 1)   # the last token never runs
        new, past = prompt, 0
        for step in range(max_new_tokens):
            batch = backend.asarray(np.asarray([new], dtype=np.int64), xp=xp)   # (1, t)
            logits = model.forward_cached(batch, kv, past, last_only=True)    # (1, 1, V)
            past += len(new)
            token = sample(backend.to_numpy(logits[0, -1]), temperature, top_k, top_p, rng)
            yield token
            if token in stop:
                return
            new = [token]
    finally:
        if was_training:
            model.train()


def greedy_batch(model, prompts, max_new_tokens: int, stop_ids=()) -> list[list[int]]:
    """Greedy continuations of several prompts at once: ``[tokens of prompt b]``, each ending
    at its first stop id (included) or after ``max_new_tokens``. The prompts are padded on
    the left to the longest (padded keys masked, positions counted from each prompt's first
    token), so one product per layer serves every row: a prompt's tokens equal ``stream``'s
    up to the float rounding of the batched products. A finished row runs on, unread, until
    every row has finished."""
    _check(0.0, None, None, max_new_tokens)
    prompts = [[check_int("token id", int(i), 0) for i in p] for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    B, L = len(prompts), max(len(p) for p in prompts)
    if L + max_new_tokens - 1 > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({L}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")
    lengths = np.asarray([len(p) for p in prompts])
    ids = np.zeros((B, L), dtype=np.int64)                                 # (B, L) left-padded
    mask = np.zeros((B, L + max_new_tokens - 1), dtype=np.int64)          # (B, keys)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = p
        mask[b, L - len(p):] = 1                                          # generated keys too
    positions = np.maximum(np.cumsum(mask[:, :L], axis=1) - 1, 0)         # (B, L)
    stop, out, done = {int(s) for s in stop_ids}, [[] for _ in prompts], np.zeros(B, bool)
    was_training = getattr(model, "training", True)
    model.eval()
    xp = model.xp
    try:
        kv = model.new_kv_cache(B, L + max_new_tokens - 1)
        new, past = ids, 0
        for step in range(max_new_tokens):
            t = new.shape[1]
            logits = model.forward_cached(
                backend.asarray(new, xp=xp), kv, past,
                attention_mask=backend.asarray(mask[:, :past + t], xp=xp),
                position_ids=backend.asarray(positions, xp=xp), last_only=True)   # (B, 1, V)
            past += t
            tokens = np.argmax(backend.to_numpy(logits[:, 0]), axis=1)           # (B,)
            for b in np.flatnonzero(~done):
                out[b].append(int(tokens[b]))
                done[b] = int(tokens[b]) in stop
            if done.all():
                break
            new, positions = tokens[:, None], (lengths + step)[:, None]         # (B, 1)
    finally:
        if was_training:
            model.train()
    return out


def generate(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k=None,
             top_p=None, stop_ids=(), rng=None) -> list[int]:
    """The prompt ``ids`` followed by the generated ones (ending with a stop id if one came)."""
    return [int(i) for i in ids] + list(stream(model, ids, max_new_tokens, temperature, top_k,
                                               top_p, stop_ids, rng))
