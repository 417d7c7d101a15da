"""Causal multi-head softmax attention on already-projected ``q, k, v (B, T, d)``.

Per head (hs = d / H):  ``P = softmax(q kᵀ / √hs + causal mask)``,  ``y = P v``.
Backward, with ``dS`` the gradient of the pre-softmax scores:

    dv = Pᵀ dy,   dP = dy vᵀ,   dS = P ⊙ (dP - D),   D = rowsum(dP ⊙ P) = rowsum(dy ⊙ y),
    dq = dS k / √hs,   dk = dSᵀ q / √hs

(D from dy and y, as FlashAttention does: B·H·T·hs products instead of a (T, T) temporary.)

The scale is folded into q before the product (B·T·d multiplies instead of B·H·T·T); the cache
holds the scaled q, k, v in head layout and P. Masked entries have P = 0, so dS is 0 there.
"""
from __future__ import annotations

import math

from .. import backend


def _heads(x, n_head: int):
    B, T, d = x.shape
    return x.reshape(B, T, n_head, d // n_head).transpose(0, 2, 1, 3)   # (B, H, T, hs)


def attention_forward(q, k, v, n_head: int):
    """``q, k, v (B, T, d)`` -> ``(y (B, T, d), cache)``."""
    xp = backend.get_namespace(q, k, v)
    B, T, d = q.shape
    if d % n_head:
        raise ValueError(f"d={d} is not divisible by n_head={n_head}")
    scale = 1.0 / math.sqrt(d // n_head)
    qh = _heads(q * scale, n_head)                  # (B, H, T, hs), pre-scaled
    kh = _heads(k, n_head)                          # (B, H, T, hs)
    vh = _heads(v, n_head)                          # (B, H, T, hs)
    att = qh @ kh.transpose(0, 1, 3, 2)             # (B, H, T, T) scores
    # -inf above the diagonal; the diagonal is always kept, so every row has a finite max
    att += xp.triu(xp.full((T, T), -math.inf, dtype=q.dtype), k=1)   # (T, T) broadcast
    att -= att.max(axis=-1, keepdims=True)          # stable softmax
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)          # (B, H, T, T) probabilities P
    yh = att @ vh                                   # (B, H, T, hs)
    y = yh.transpose(0, 2, 1, 3).reshape(B, T, d)   # (B, T, H, hs) -> (B, T, d)
    return y, (qh, kh, vh, att, scale, yh)


def attention_backward(dy, cache):
    """Returns ``(dq, dk, dv)``, each ``(B, T, d)``."""
    qh, kh, vh, att, scale, yh = cache
    B, H, T, hs = qh.shape
    dyh = dy.reshape(B, T, H, hs).transpose(0, 2, 1, 3)      # (B, H, T, hs)
    dvh = att.transpose(0, 1, 3, 2) @ dyh                    # (B, H, T, hs)
    ds = dyh @ vh.transpose(0, 1, 3, 2)                      # (B, H, T, T) dP
    ds -= (dyh * yh).sum(axis=-1, keepdims=True)             # (B, H, T, 1) D
    ds *= att                                                # dS, softmax backward
    dqh = ds @ kh                                            # (B, H, T, hs)
    dqh *= scale
    dkh = ds.transpose(0, 1, 3, 2) @ qh                      # (B, H, T, hs); qh already scaled

    def merge(xh):                                           # (B, H, T, hs) -> (B, T, d)
        return xh.transpose(0, 2, 1, 3).reshape(B, T, H * hs)
    return merge(dqh), merge(dkh), merge(dvh)
