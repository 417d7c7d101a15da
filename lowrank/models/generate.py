"""Autoregressive generation for the models that generate (lowrank's GPT, imported GPT-2),
with a KV cache (docs/performance.md#kv-cache).

Without a cache every new token re-runs the whole window: T positions through every block
for one row of logits. With it, the prompt runs once (the prefill) and each new token runs
one position, attending to the keys and values kept from the earlier ones. Positions are
absolute, so once a sequence outgrows the context the window slides and every cached key
changes: from then on each token re-runs its window, exactly as without a cache (the
output is the same either way; only the speed within the context differs).
"""
from __future__ import annotations

import numpy as np

from .. import backend


def sample_next(logits, temperature: float, top_k: int | None, rng) -> int:
    """One token id from a host row of logits ``(V,)``: the argmax when ``temperature`` is 0,
    else a draw from ``softmax(logits / temperature)`` over the ``top_k`` largest."""
    last = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(last))
    last = last / max(temperature, 1e-6)
    if top_k and top_k < last.size:
        cutoff = np.partition(last, -top_k)[-top_k]
        last[last < cutoff] = -np.inf
    probs = np.exp(last - last.max())
    return int(rng.choice(last.size, p=probs / probs.sum()))


def generate(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k=None,
             rng=None, use_cache: bool = True) -> list[int]:
    """``ids`` (a list of ints, the prompt; at least one) followed by ``max_new_tokens``
    generated ones. ``temperature=0`` is greedy; ``rng`` (a numpy Generator or seed) draws
    otherwise. ``use_cache=False`` re-runs the window for every token (the reference)."""
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("ids must hold at least one token (the prompt)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    rng = backend.host_rng(0 if rng is None else rng)
    was_training = getattr(model, "training", True)
    model.eval()
    xp, C = model.xp, model.config.context
    kv, past = None, 0          # the cache holds positions 0 .. past-1 of ids
    try:
        for _ in range(max_new_tokens):
            if use_cache and len(ids) <= C:
                if kv is None:
                    kv = model.new_kv_cache(1)
                new = backend.asarray(np.asarray([ids[past:]], dtype=np.int64), xp=xp)
                logits = model.forward_cached(new, kv, past, last_only=True)   # (1, 1, V)
                past = len(ids)
            else:               # no cache, or the window slides: re-run it
                window = backend.asarray(np.asarray([ids[-C:]], dtype=np.int64), xp=xp)
                logits, _ = model.forward(window)                 # (1, T, V)
            ids.append(sample_next(backend.to_numpy(logits[0, -1]), temperature, top_k, rng))
    finally:
        if was_training:
            model.train()
    return ids
