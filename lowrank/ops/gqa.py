"""Grouped-query causal attention (docs/llama.md#gqa): ``H`` query heads share ``Hkv`` key/value
heads in groups of ``G = H / Hkv`` (query head h reads key/value head ``h // G``, as
transformers' ``repeat_kv``). The repeated heads are never formed: a group's G query heads
are stacked on the query axis, ``(B, Hkv, G·T, hs)``, against its one key/value head
``(B, Hkv, T, hs)``, so every product runs once per key/value head and the backward's sum
over the group falls out of the products:

    Sᵀ = K Qᵀ/√hs + M,   P = softmax over keys,   Y = P V
    dV = Pᵀ dY,   dS = P ⊙ (dY Vᵀ - D),   D = rowsum(dY ⊙ Y),   dQ = dS K/√hs,   dK = dSᵀ Q/√hs

with dV and dK summing over the G·T stacked query rows, i.e. over the group. ``M`` is the
causal mask (-inf on keys after the query) plus the key-padding bias (the dtype's lowest
finite value on padded keys, as transformers adds it; ``attention.key_padding_bias``). The
scores are kept transposed (keys on the rows), as in ``attention.py``, whose softmax this
reuses.
"""
from __future__ import annotations

import math

from .. import backend
from .attention import _softmax_over_keys, key_padding_bias


def _stack_groups(q, n_kv: int):
    """``q (B, T, H, hs)`` -> ``(B, Hkv, G·T, hs)``: group j's heads j·G .. j·G+G-1 stacked."""
    B, T, H, hs = q.shape
    G = H // n_kv
    qg = q.reshape(B, T, n_kv, G, hs).transpose(0, 2, 3, 1, 4)      # (B, Hkv, G, T, hs)
    return qg.reshape(B, n_kv, G * T, hs)


def _unstack_groups(yg, T: int):
    """``(B, Hkv, G·T, hs)`` -> ``(B, T, H, hs)``."""
    B, n_kv, GT, hs = yg.shape
    G = GT // T
    y = yg.reshape(B, n_kv, G, T, hs).transpose(0, 3, 1, 2, 4)      # (B, T, Hkv, G, hs)
    return y.reshape(B, T, n_kv * G, hs)


def _heads(x):
    return x.transpose(0, 2, 1, 3)                       # (B, T, h, hs) <-> (B, h, T, hs)


def _check(q, k, v):
    B, T, H, hs = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != hs:
        raise ValueError(f"k and v must be (B, T, Hkv, hs) = ({B}, {T}, ·, {hs}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if H % k.shape[2]:
        raise ValueError(f"{H} query heads do not split into groups over {k.shape[2]} "
                         "key/value heads")


def _probabilities(qg, kh, past: int, key_mask, xp):
    """``Pᵀ (B, Hkv, S, G·t)`` of stacked queries at positions ``past .. past+t-1`` over keys
    ``0 .. S-1``, in place of the scores."""
    S, Gt = kh.shape[2], qg.shape[2]
    t = S - past
    attT = kh @ qg.transpose(0, 1, 3, 2)                            # (B, Hkv, S, G·t)
    if t > 1:   # key j is after query i (position past+i) when j > past+i
        causal = xp.tril(xp.full((S, t), -math.inf, dtype=qg.dtype), k=-past - 1)   # (S, t)
        attT += xp.concatenate([causal] * (Gt // t), axis=1)       # (S, G·t)
    if key_mask is not None:
        attT += key_padding_bias(key_mask, qg.dtype).transpose(0, 1, 3, 2)   # (B, 1, S, 1)
    _softmax_over_keys(attT, xp)
    return attT


def gqa_forward(q, k, v, key_mask=None):
    """``q (B, T, H, hs)``, ``k, v (B, T, Hkv, hs)``, optional ``key_mask (B, T)`` (1 keep,
    0 pad) -> ``(y (B, T, H·hs), cache)``, causal."""
    xp = backend.get_namespace(q, k, v)
    _check(q, k, v)
    B, T, H, hs = q.shape
    if key_mask is not None and tuple(key_mask.shape) != (B, T):
        raise ValueError(f"key_mask must have shape {(B, T)}, got {tuple(key_mask.shape)}")
    scale = 1.0 / math.sqrt(hs)
    qg = _stack_groups(q * scale, k.shape[2])                       # (B, Hkv, G·T, hs) scaled
    kh, vh = _heads(k), _heads(v)                                   # (B, Hkv, T, hs) views
    attT = _probabilities(qg, kh, 0, key_mask, xp)                  # (B, Hkv, T, G·T)
    yg = attT.transpose(0, 1, 3, 2) @ vh                            # (B, Hkv, G·T, hs)
    y = _unstack_groups(yg, T).reshape(B, T, H * hs)                # (B, T, H·hs)
    return y, (qg, kh, vh, attT, yg, scale)


def gqa_backward(dy, cache):
    """``dy (B, T, H·hs)`` -> ``(dq (B, T, H, hs), dk, dv (B, T, Hkv, hs))``."""
    xp = backend.get_namespace(dy)
    qg, kh, vh, attT, yg, scale = cache
    B, n_kv, T, hs = kh.shape
    dyg = _stack_groups(dy.reshape(B, T, -1, hs), n_kv)             # (B, Hkv, G·T, hs)
    dvh = attT @ dyg                                                # (B, Hkv, T, hs): Σ group
    dsT = vh @ dyg.transpose(0, 1, 3, 2)                            # (B, Hkv, T, G·T) dPᵀ
    D = (dyg * yg) @ xp.ones((hs, 1), dtype=dy.dtype)               # (B, Hkv, G·T, 1)
    dsT -= D.transpose(0, 1, 3, 2)
    dsT *= attT                                                     # dSᵀ
    dqg = dsT.transpose(0, 1, 3, 2) @ kh                            # (B, Hkv, G·T, hs)
    dqg *= scale
    dkh = dsT @ qg                                                  # (B, Hkv, T, hs): Σ group
    return _unstack_groups(dqg, T), _heads(dkh), _heads(dvh)


def gqa_cached(q, k, v, kv, past: int, key_mask=None):
    """Inference over a KV cache (docs/llama.md#kv-cache): ``q (B, t, H, hs)``, ``k, v
    (B, t, Hkv, hs)`` are positions ``past .. past+t-1``; ``kv = (K, V)``, each
    ``(B, Hkv, C, hs)`` (one head per group), receives their keys and values and the new
    rows attend to positions ``0 .. past+t-1``; ``key_mask (B, past+t)`` marks padded keys.
    Returns ``y (B, t, H·hs)``, equal to gqa_forward's rows over the whole prefix."""
    xp = backend.get_namespace(q, k, v)
    _check(q, k, v)
    K, V = kv
    B, t, H, hs = q.shape
    S = past + t
    if S > K.shape[2]:
        raise ValueError(f"positions up to {S} do not fit the cache's {K.shape[2]}")
    if key_mask is not None and tuple(key_mask.shape) != (B, S):
        raise ValueError(f"key_mask must have shape {(B, S)}, got {tuple(key_mask.shape)}")
    K[:, :, past:S] = _heads(k)                                     # (B, Hkv, t, hs)
    V[:, :, past:S] = _heads(v)
    qg = _stack_groups(q * (1.0 / math.sqrt(hs)), K.shape[1])       # (B, Hkv, G·t, hs)
    attT = _probabilities(qg, K[:, :, :S], past, key_mask, xp)      # (B, Hkv, S, G·t)
    yg = attT.transpose(0, 1, 3, 2) @ V[:, :, :S]                   # (B, Hkv, G·t, hs)
    return _unstack_groups(yg, t).reshape(B, t, H * hs)
