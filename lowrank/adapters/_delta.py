"""The low-rank correction alone, for the multi-adapter fast path (``lowrank.parallel.multi``).

Not a variant (leading underscore: not auto-imported). A variant whose adapted map is the
*unchanged* base plus a correction computed from x alone,

    y = x W0ᵀ + b0 + Δy,     Δy = c · ((x_d Pᵀ) ⊙ g) Bᵀ

(LoRA/rsLoRA: P = A, g = 1; AdaLoRA/IncreLoRA: P = E ⊙_rows A, g = 1; SoRA: P = A, g = gate),
offers ``delta_forward(x, dropout_mask) -> (Δy, cache)`` and ``delta_backward(dy, cache) ->
dx_Δ`` built on these two functions; the caller computes ``x W0ᵀ + b0`` and ``G W0`` once for
the rows of many adapters. With x_d = dropout(x), u = x_d Pᵀ (N, r), v = u ⊙ g and G = dL/dy:

    dB = c Gᵀ v,   dv = c G B,   dg = Σ_rows(dv ⊙ u),   du = dv ⊙ g,   dP = duᵀ x_d,
    dx_Δ = (du P) ⊙ mask                          (the full dx is G W0 + dx_Δ)

These are the formulas of each variant's own ``adapter_backward`` (its dropout branch),
split at the shared base product.
"""
from __future__ import annotations

from typing import NamedTuple


class DeltaCache(NamedTuple):
    x2: object        # (N, n) the dropped-out input x_d, flattened
    mask: object      # x's shape: the inverted-dropout multiplier, or None
    u: object         # (N, r) x_d Pᵀ
    P: object         # (r, n) the down projection the forward used
    c: float          # the scaling
    g: object         # (r,) the gate, or None
    shape: tuple      # x's shape


def lowrank_delta_forward(layer, x, dropout_mask, P, B, c: float, g=None):
    """``(Δy (..., m), DeltaCache)`` with ``Δy = c ((x_d Pᵀ) ⊙ g) Bᵀ``; ``layer.dropout``
    draws (or checks) the mask exactly as the layer's own forward would."""
    x_d, mask = layer.dropout(x, dropout_mask)
    r, n = P.shape
    x2 = x_d.reshape(-1, n)                                              # (N, n)
    u = x2 @ P.T                                                         # (N, r)
    v = u if g is None else u * g                                        # (N, r)
    delta = v @ (B.T * float(c))                                         # (N, m); c on (r, m)
    return delta.reshape(*x.shape[:-1], B.shape[0]), DeltaCache(x2, mask, u, P, float(c), g,
                                                                tuple(x.shape))


def lowrank_delta_backward(dy, cache: DeltaCache, B, need_dP: bool = True,
                           need_dg: bool = False):
    """Accumulate B's gradient (when trainable); return ``(dP, dg, dx_Δ)`` (dP, dg None when
    not asked for). ``B`` is the Parameter, ``dy`` the gradient of the layer's output."""
    x2, mask, u, P, c, g, shape = cache
    m = B.shape[0]
    dy2 = dy.reshape(-1, m)                                              # (N, m)
    if B.trainable:
        dB = dy2.T @ (u if g is None else u * g)                         # (m, r)
        dB *= c
        B.accumulate(dB)
    dv = dy2 @ B.data                                                    # (N, r)
    dv *= c
    dg = (dv * u).sum(axis=0) if need_dg else None                       # (r,)
    du = dv if g is None else dv * g                                     # (N, r)
    dP = du.T @ x2 if need_dP else None                                  # (r, n)
    dx = (du @ P).reshape(shape)                                         # (..., n)
    if mask is not None:
        dx *= mask
    return dP, dg, dx
