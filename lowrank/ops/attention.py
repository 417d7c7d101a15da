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
With attention dropout, ``y = P_d v``, ``P_d = P ⊙ mask``: ``dv = P_dᵀ dy``, ``dP = (dy vᵀ) ⊙ mask``,
and D = rowsum(dP ⊙ P) = rowsum(dy ⊙ y) still (docs/ops.md#attention-dropout).
M is a constant, so it never appears in the backward: masked entries have P = 0 exactly
(exp underflows), hence dS = 0 there and a padded key receives and gives no gradient.

The scale is folded into q before the product (B·T·d multiplies instead of B·H·T·T); the cache
holds the scaled q, k, v in head layout and Pᵀ (the scores are formed transposed, keys on the
rows: the softmax's reductions then run over whole rows).
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


# Causal attention in chunks of this many queries (docs/performance.md#causal-chunks); None:
# one (T, T) product, the reference the chunks are tested against
CAUSAL_CHUNK = 64


def attention_forward(q, k, v, n_head: int, causal: bool = True, key_mask=None,
                      dropout: float = 0.0, rng=None, chunk: int | None = CAUSAL_CHUNK):
    """``q, k, v (B, T, d)``, optional ``key_mask (B, T)`` (1 keep, 0 pad) ->
    ``(y (B, T, d), cache)``. ``dropout > 0`` drops attention probabilities (BERT's
    ``attention_probs_dropout_prob``, docs/ops.md#attention-dropout): the mask comes from
    ``rng`` (a ``backend.DeviceRNG``). Causal attention without a key mask or dropout runs
    in chunks of ``chunk`` queries, each over the keys it can see (``None``: whole)."""
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
    if causal and key_mask is None and dropout == 0.0 and chunk is not None and T > chunk:
        yh, chunks = _causal_chunks_forward(qh, kh, vh, chunk, xp)
        y = yh.transpose(0, 2, 1, 3).reshape(B, T, d)   # (B, T, H, hs) -> (B, T, d)
        return y, (qh, kh, vh, chunks, scale, yh, None)
    # Scores kept transposed, keys on the rows: attT[b, h, j, i] = q_i · k_j. The softmax over
    # keys then reduces over axis -2 as whole-row vector ops; a reduction along a short last
    # axis (T ~ 40) pays per row (docs/performance.md#attention-layout)
    attT = kh @ qh.transpose(0, 1, 3, 2)            # (B, H, Tk, Tq) scores, transposed
    if causal:
        # -inf below the diagonal (key j > query i); the diagonal is kept: finite maxima
        attT += xp.tril(xp.full((T, T), -math.inf, dtype=q.dtype), k=-1)   # (Tk, Tq)
    if key_mask is not None:
        attT += key_padding_bias(key_mask, q.dtype).transpose(0, 1, 3, 2)   # (B, 1, Tk, 1)
    _softmax_over_keys(attT, xp)                    # (B, H, Tk, Tq) probabilities Pᵀ
    dropped, mask = _drop(attT, dropout, rng)       # (Pᵀ ⊙ maskᵀ), maskᵀ or None
    yh = dropped.transpose(0, 1, 3, 2) @ vh         # (B, H, Tq, hs) = P_d v
    y = yh.transpose(0, 2, 1, 3).reshape(B, T, d)   # (B, T, H, hs) -> (B, T, d)
    return y, (qh, kh, vh, attT, scale, yh, mask)


def _softmax_over_keys(attT, xp) -> None:
    """In place: a stable softmax over axis -2 (the keys) of transposed scores."""
    attT -= attT.max(axis=-2, keepdims=True)
    xp.exp(attT, out=attT)
    attT /= attT.sum(axis=-2, keepdims=True)


def _causal_chunks_forward(qh, kh, vh, chunk: int, xp):
    """Queries ``a:b`` see keys ``0:b`` only: each chunk's scores are ``(B, H, b, b - a)``,
    and the keys after the chunk, fully masked, are never computed (about half the (T, T)
    products and passes for many chunks). Returns ``yh`` and ``[((a, b), Pᵀ)]``."""
    T = qh.shape[2]
    yh = xp.empty_like(qh)                                 # (B, H, T, hs)
    chunks = []
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        attT = kh[:, :, :b] @ qh[:, :, a:b].transpose(0, 1, 3, 2)   # (B, H, b, b-a)
        # the diagonal block: key a+j after query a+i is masked (j > i)
        attT[:, :, a:] += xp.tril(xp.full((b - a, b - a), -math.inf, dtype=qh.dtype), k=-1)
        _softmax_over_keys(attT, xp)                       # Pᵀ of this chunk
        yh[:, :, a:b] = attT.transpose(0, 1, 3, 2) @ vh[:, :, :b]   # (B, H, b-a, hs)
        chunks.append(((a, b), attT))
    return yh, chunks


def _causal_chunks_backward(dyh, qh, kh, vh, D, chunks, xp):
    """``(dqh, dkh, dvh)`` (each ``(B, H, T, hs)``, dq not yet scaled) from the chunks'
    probabilities; the last chunk (every key) first, so it writes dk and dv whole and the
    others add into their keys."""
    dqh = xp.empty_like(qh)
    dkh = dvh = None
    for (a, b), attT in reversed(chunks):
        dy_c = dyh[:, :, a:b]                              # (B, H, b-a, hs)
        dsT = vh[:, :, :b] @ dy_c.transpose(0, 1, 3, 2)    # (B, H, b, b-a) dPᵀ
        dsT -= D[:, :, a:b].transpose(0, 1, 3, 2)          # (B, H, 1, b-a) broadcast
        dsT *= attT                                        # dSᵀ
        dqh[:, :, a:b] = dsT.transpose(0, 1, 3, 2) @ kh[:, :, :b]
        if dkh is None:                                    # b = T: every key
            dvh, dkh = attT @ dy_c, dsT @ qh[:, :, a:b]
        else:
            dvh[:, :, :b] += attT @ dy_c                   # (B, H, b, hs)
            dkh[:, :, :b] += dsT @ qh[:, :, a:b]
    return dqh, dkh, dvh


def _drop(attT, p: float, rng):
    """``(Pᵀ ⊙ maskᵀ, maskᵀ)``, or ``(Pᵀ, None)`` without dropout."""
    if p == 0.0:
        return attT, None
    return rng.dropout(attT, p)


def attention_backward(dy, cache):
    """Returns ``(dq, dk, dv)``, each ``(B, T, d)``; every (T, T) array is transposed as in
    the forward (keys on the rows)."""
    xp = backend.get_namespace(dy)
    qh, kh, vh, attT, scale, yh, mask = cache
    B, H, T, hs = qh.shape
    dyh = dy.reshape(B, T, H, hs).transpose(0, 2, 1, 3)      # (B, H, T, hs)

    def merge(xh):                                           # (B, H, T, hs) -> (B, T, d)
        return xh.transpose(0, 2, 1, 3).reshape(B, T, H * hs)
    if isinstance(attT, list):                               # causal, in chunks
        D = (dyh * yh) @ xp.ones((hs, 1), dtype=dy.dtype)    # (B, H, T, 1)
        dqh, dkh, dvh = _causal_chunks_backward(dyh, qh, kh, vh, D, attT, xp)
        dqh *= scale
        return merge(dqh), merge(dkh), merge(dvh)
    dvh = (attT if mask is None else attT * mask) @ dyh      # (B, H, Tk, hs) = P_dᵀ dy
    dsT = vh @ dyh.transpose(0, 1, 3, 2)                     # (B, H, Tk, Tq) dP_dᵀ
    if mask is not None:
        dsT *= mask                                          # dPᵀ
    ones = xp.ones((hs, 1), dtype=dy.dtype)
    D = (dyh * yh) @ ones                                    # (B, H, Tq, 1), a GEMV
    dsT -= D.transpose(0, 1, 3, 2)                           # (B, H, 1, Tq) broadcast
    dsT *= attT                                              # dSᵀ, softmax backward
    dqh = dsT.transpose(0, 1, 3, 2) @ kh                     # (B, H, Tq, hs) = dS k
    dqh *= scale
    dkh = dsT @ qh                                           # (B, H, Tk, hs); qh already scaled
    return merge(dqh), merge(dkh), merge(dvh)


def attention_cached(q, k, v, n_head: int, kv, past: int):
    """Causal attention of new positions over a KV cache, for generation
    (docs/performance.md#kv-cache).

    ``q, k, v (B, t, d)`` are positions ``past .. past+t-1``; ``kv = (K, V)``, each
    ``(B, H, C, hs)``, receives their keys and values at those positions, and the new rows
    attend to positions ``0 .. past+t-1`` read back from it. The rows equal those of
    ``attention_forward(..., causal=True)`` over the whole prefix. Inference only: nothing is
    kept for a backward (generation never differentiates), so this op has no ``_backward``.
    """
    xp = backend.get_namespace(q, k, v)
    K, V = kv
    B, t, d = q.shape
    S = past + t
    if S > K.shape[2]:
        raise ValueError(f"positions up to {S} do not fit the cache's {K.shape[2]}")
    scale = 1.0 / math.sqrt(d // n_head)
    K[:, :, past:S] = _heads(k, n_head)             # (B, H, t, hs) into the cache
    V[:, :, past:S] = _heads(v, n_head)
    qh = _heads(q * scale, n_head)                  # (B, H, t, hs), pre-scaled
    att = qh @ K[:, :, :S].transpose(0, 1, 3, 2)    # (B, H, t, S)
    if t > 1:   # new row i is position past+i: keys j > past+i are its future
        att += xp.triu(xp.full((t, S), -math.inf, dtype=q.dtype), k=past + 1)   # (t, S)
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    yh = att @ V[:, :, :S]                          # (B, H, t, hs)
    return yh.transpose(0, 2, 1, 3).reshape(B, t, d)   # (B, t, d)


def attention_varlen_forward(q, k, v, n_head: int, starts, dropout: float = 0.0, rng=None):
    """Bidirectional attention within each sequence of packed rows
    (docs/performance.md#varlen-attention): ``q, k, v (N, d)`` hold the real tokens of every
    sequence one after another, sequence ``s`` in rows ``starts[s]:starts[s+1]`` (host ints).
    Each attends over its own rows only, which is what key-padding-masked attention gives
    its real queries (a padded key's weight is exactly 0 there). -> ``(y (N, d), cache)``."""
    xp = backend.get_namespace(q, k, v)
    N, d = q.shape
    H, hs = n_head, d // n_head
    scale = 1.0 / math.sqrt(hs)
    y = xp.empty_like(q)                                       # (N, d)
    kept = []
    for a, b in zip(starts[:-1], starts[1:]):
        L = b - a
        if L == 0:                                             # a sequence with no tokens
            kept.append(None)
            continue
        qh = (q[a:b] * scale).reshape(L, H, hs).transpose(1, 0, 2)   # (H, L, hs) pre-scaled
        kh = k[a:b].reshape(L, H, hs).transpose(1, 0, 2)       # (H, L, hs) views
        vh = v[a:b].reshape(L, H, hs).transpose(1, 0, 2)
        attT = kh @ qh.transpose(0, 2, 1)                      # (H, Lk, Lq) scores, transposed
        _softmax_over_keys(attT, xp)                           # Pᵀ
        dropped, mask = _drop(attT, dropout, rng)              # P_dᵀ, maskᵀ or None
        yh = dropped.transpose(0, 2, 1) @ vh                   # (H, Lq, hs)
        y[a:b] = yh.transpose(1, 0, 2).reshape(L, d)           # (L, H, hs) -> (L, d)
        kept.append((qh, attT, yh, mask))
    return y, (k, v, starts, scale, kept)


def attention_varlen_backward(dy, cache):
    """Returns ``(dq, dk, dv)``, each ``(N, d)``: the backward of attention_forward's, per
    sequence."""
    xp = backend.get_namespace(dy)
    k, v, starts, scale, kept = cache
    N, d = dy.shape
    dq, dk, dv = xp.empty_like(dy), xp.empty_like(dy), xp.empty_like(dy)   # (N, d) each
    for (a, b), state in zip(zip(starts[:-1], starts[1:]), kept):
        if state is None:
            continue
        qh, attT, yh, mask = state
        H, L, hs = qh.shape
        dyh = dy[a:b].reshape(L, H, hs).transpose(1, 0, 2)     # (H, L, hs)
        kh = k[a:b].reshape(L, H, hs).transpose(1, 0, 2)
        vh = v[a:b].reshape(L, H, hs).transpose(1, 0, 2)
        dropped = attT if mask is None else attT * mask        # P_dᵀ
        dv[a:b] = (dropped @ dyh).transpose(1, 0, 2).reshape(L, d)     # P_dᵀ dy
        dsT = vh @ dyh.transpose(0, 2, 1)                      # (H, Lk, Lq) dP_dᵀ
        if mask is not None:
            dsT *= mask                                        # dPᵀ
        dsT -= xp.einsum("hqe,hqe->hq", dyh, yh)[:, None, :]   # D (H, 1, Lq)
        dsT *= attT                                            # dSᵀ
        dqh = dsT.transpose(0, 2, 1) @ kh                      # (H, Lq, hs)
        dqh *= scale
        dq[a:b] = dqh.transpose(1, 0, 2).reshape(L, d)
        dk[a:b] = (dsT @ qh).transpose(1, 0, 2).reshape(L, d)  # qh already scaled
    return dq, dk, dv
