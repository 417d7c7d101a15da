"""Fused softmax + mean token cross-entropy (llm.c's ``crossentropy_softmax``).

    loss = mean over the N = B·T tokens of ( logsumexp(z_n) - z_n[t_n] )
    dz   = (softmax(z) - onehot(t)) / N

The forward keeps the probabilities; backward turns them into ``dlogits`` *in place* (the
(N, V) buffer is the largest activation of a small model), so a cache serves one backward.
"""
from __future__ import annotations

from .. import backend


def check_targets(targets, size: int, name: str = "targets") -> None:
    """Integer ids in ``[0, size)``; raises ValueError otherwise."""
    if targets.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {targets.dtype}")
    if targets.size and (int(targets.min()) < 0 or int(targets.max()) >= size):
        raise ValueError(f"{name} must lie in [0, {size}), got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")


def cross_entropy_forward(logits, targets):
    """``logits (B, T, V)``, ``targets (B, T)`` int -> ``(loss: float, cache)``."""
    xp = backend.get_namespace(logits, targets)
    V = logits.shape[-1]
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    check_targets(targets, V)
    z = logits.reshape(-1, V)                           # (N, V)
    t = targets.reshape(-1)                             # (N,)
    rows = xp.arange(z.shape[0])
    zmax = z.max(axis=-1, keepdims=True)                # (N, 1)
    probs = z - zmax                                    # (N, V) shifted, exponentiated in place
    target_shifted = probs[rows, t]                     # (N,)  z_t - max
    xp.exp(probs, out=probs)
    total = probs.sum(axis=-1, keepdims=True)           # (N, 1)
    loss = float((xp.log(total[:, 0]) - target_shifted).mean())
    probs /= total
    return loss, {"probs": probs, "targets": t, "rows": rows, "shape": tuple(logits.shape)}


def cross_entropy_backward(cache, dloss: float = 1.0):
    """``dlogits (B, T, V)`` for ``d loss = dloss``; consumes the cache (reuses its buffer)."""
    probs = cache.pop("probs", None)
    if probs is None:
        raise RuntimeError("cross_entropy_backward: this cache was already used")
    probs[cache["rows"], cache["targets"]] -= 1.0       # softmax - onehot
    probs *= float(dloss) / probs.shape[0]              # mean over tokens
    return probs.reshape(cache["shape"])                # (B, T, V)
