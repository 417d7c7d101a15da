"""LayerNorm over the last axis: ``y = (x - μ) / √(σ² + eps) · w + b`` (biased σ², eps 1e-5).

With ``x̂ = (x - μ)·rstd`` and ``g = dy ⊙ w`` the input gradient is the classic

    dx = rstd · (g - mean(g) - x̂ · mean(g ⊙ x̂))          (means over the last axis)

so the cache keeps ``x̂`` and ``rstd`` (not x): that is everything backward needs.
"""
from __future__ import annotations

from .. import backend

EPS = 1e-5


def layernorm_forward(x, weight, bias, eps: float = EPS):
    """``x (..., d)``, ``weight, bias (d,)`` -> ``(y, (xhat, rstd, weight))``."""
    xp = backend.get_namespace(x, weight, bias)
    d = x.shape[-1]
    x2 = x.reshape(-1, d)                              # (N, d)
    inv_d = xp.full((d,), 1.0 / d, dtype=x.dtype)      # row means as GEMVs: one pass, no temp
    xhat = x2 - (x2 @ inv_d)[:, None]                  # (N, d) centred, normalised below
    var = xp.einsum("nd,nd->n", xhat, xhat)            # (N,) Σ (x - μ)², no (N, d) temporary
    var *= 1.0 / d                                     # biased, as torch
    var += eps
    rstd = 1.0 / xp.sqrt(var[:, None])                 # (N, 1)
    xhat *= rstd
    y = xhat * weight                                  # (N, d)
    y += bias
    return y.reshape(x.shape), (xhat.reshape(x.shape), rstd.reshape(*x.shape[:-1], 1), weight)


def layernorm_backward(dy, cache, need_dweight: bool = True, need_dbias: bool = True):
    """Returns ``(dx, dweight, dbias)``; gradients not asked for are ``None`` and never computed."""
    xp = backend.get_namespace(dy)
    xhat, rstd, weight = cache
    d = weight.shape[0]
    dy2, xhat2 = dy.reshape(-1, d), xhat.reshape(-1, d)                      # (N, d)
    dweight = xp.einsum("nd,nd->d", dy2, xhat2) if need_dweight else None   # (d,)
    dbias = dy2.sum(axis=0) if need_dbias else None                         # (d,)
    inv_d = xp.full((d,), 1.0 / d, dtype=dy.dtype)
    g = dy2 * weight                                   # (N, d)
    proj = xp.einsum("nd,nd->n", g, xhat2)             # (N,) d · mean(g ⊙ x̂)
    proj *= 1.0 / d
    g -= (g @ inv_d)[:, None]                          # g - mean(g)
    g -= xhat2 * proj[:, None]
    g *= rstd.reshape(-1, 1)
    return g.reshape(dy.shape), dweight, dbias
