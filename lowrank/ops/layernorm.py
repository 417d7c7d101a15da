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
    mean = x.mean(axis=-1, keepdims=True)              # (..., 1)
    xhat = x - mean                                    # (..., d) centred, normalised below
    var = (xhat * xhat).mean(axis=-1, keepdims=True)   # (..., 1)  biased, as torch
    var += eps
    rstd = 1.0 / xp.sqrt(var)                          # (..., 1)
    xhat *= rstd
    y = xhat * weight                                  # (..., d)
    y += bias
    return y, (xhat, rstd, weight)


def layernorm_backward(dy, cache, need_dweight: bool = True, need_dbias: bool = True):
    """Returns ``(dx, dweight, dbias)``; gradients not asked for are ``None`` and never computed."""
    xhat, rstd, weight = cache
    d = weight.shape[0]
    dweight = (dy * xhat).reshape(-1, d).sum(axis=0) if need_dweight else None   # (d,)
    dbias = dy.reshape(-1, d).sum(axis=0) if need_dbias else None               # (d,)
    g = dy * weight                                    # (..., d)
    proj = (g * xhat).mean(axis=-1, keepdims=True)     # (..., 1)
    g -= g.mean(axis=-1, keepdims=True)
    g -= xhat * proj
    g *= rstd
    return g, dweight, dbias
