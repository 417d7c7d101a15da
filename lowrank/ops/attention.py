"""Multi-head softmax attention on already-projected ``q, k, v (B, T, d)``: causal (GPT) or
bidirectional with an additive key-padding mask (BERT). Math: docs/ops.md#attention,
docs/pretrained.md#masked-attention.

Per head (hs = d / H):  ``P = softmax(q kᵀ / √hs + M)``,  ``y = P v``, where M is the causal
mask (-inf above the diagonal) and/or the key-padding mask (the dtype's lowest finite value
on every padded key column, as transformers adds it). Backward, with ``dS`` the gradient of
the pre-softmax scores:

    dv = Pᵀ dy,   dP = dy vᵀ,   dS = P ⊙ (dP - D),   D = rowsum(dP ⊙ P) = rowsum(dy ⊙ y),
    dq = dS k / √hs,   dk = dSᵀ q / √hs

(D from dy and y, as FlashAttention does: B·H·T·hs products instead of a (T, T) temporary.)
M is a constant, so it never appears in the backward: masked entries have P = 0 exactly
(exp underflows), hence dS = 0 there and a padded key receives and gives no gradient.

The scale is folded into q before the product (B·T·d multiplies instead of B·H·T·T); the cache
holds the scaled q, k, v in head layout and P.
"""
from __future__ import annotations

import math

from .. import backend


def _heads(x, n_head: int):
    B, T, d = x.shape
    return x.reshape(B, T, n_head, d // n_head).transpose(0, 2, 1, 3)   # (B, H, T, hs)


def key_padding_bias(key_mask, dtype):
    """``(B, 1, 1, T)`` additive bias: 0 where ``key_mask`` is nonzero, the dtype's lowest
    finite value where it is 0. A finite value (not -inf) keeps a fully padded row finite
    (uniform weights, as transformers gives) instead of NaN."""
    xp = backend.get_namespace(key_mask)
    lowest = float(xp.finfo(dtype).min)
    bias = (key_mask == 0).astype(dtype)             # (B, T) 1.0 on padded keys
    bias *= lowest
    return bias[:, None, None, :]                    # (B, 1, 1, T)


def attention_forward(q, k, v, n_head: int, causal: bool = True, key_mask=None):
    """``q, k, v (B, T, d)``, optional ``key_mask (B, T)`` (1 keep, 0 pad) ->
    ``(y (B, T, d), cache)``."""
    xp = backend.get_namespace(q, k, v)
    B, T, d = q.shape
    if d % n_head:
        raise ValueError(f"d={d} is not divisible by n_head={n_head}")
    if key_mask is not None and tuple(key_mask.shape) != (B, T):
        raise ValueError(f"key_mask must have shape {(B, T)}, got {tuple(key_mask.shape)}")
    scale = 1.0 / math.sqrt(d // n_head)
    qh = _heads(q * scale, n_head)                  # (B, H, T, hs), pre-scaled
    kh = _heads(k, n_head)                          # (B, H, T, hs)
    vh = _heads(v, n_head)                          # (B, H, T, hs)
    att = qh @ kh.transpose(0, 1, 3, 2)             # (B, H, T, T) scores
    if causal:
        # -inf above the diagonal; the diagonal is always kept, so every row has a finite max
        att += xp.triu(xp.full((T, T), -math.inf, dtype=q.dtype), k=1)   # (T, T) broadcast
    if key_mask is not None:
        att += key_padding_bias(key_mask, q.dtype)  # (B, 1, 1, T) broadcast over heads, rows
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
