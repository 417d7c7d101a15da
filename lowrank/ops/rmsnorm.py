"""RMSNorm over the last axis (docs/llama.md#rmsnorm): ``y = x · rstd ⊙ g`` with
``rstd = 1 / √(mean(x²) + eps)`` (no centring, no bias).

The statistics run in float32 at least (transformers' LlamaRMSNorm upcasts half precision to
float32 and casts back); float32 and float64 inputs keep their own dtype. With ``x̂ = x·rstd``:

    dg = Σ_rows dy ⊙ x̂,    dx = rstd · (u - x̂ · mean(u ⊙ x̂)),   u = dy ⊙ g

(LayerNorm's backward without the mean(u) term: there is no centring). The cache keeps
``x̂`` and ``rstd``.
"""
from __future__ import annotations

from .. import backend


def _stat_dtype(xp, dtype):
    """float32 at least: half precision upcasts, float32/float64 stay."""
    return xp.promote_types(dtype, xp.float32)


def rmsnorm_forward(x, weight, eps: float):
    """``x (..., d)``, ``weight (d,)`` -> ``(y, (xhat, rstd, weight))``."""
    xp = backend.get_namespace(x, weight)
    d = x.shape[-1]
    x2 = x.reshape(-1, d).astype(_stat_dtype(xp, x.dtype), copy=False)   # (N, d)
    ms = xp.einsum("nd,nd->n", x2, x2)                 # (N,) Σ x², no (N, d) temporary
    ms *= 1.0 / d
    ms += eps
    rstd = 1.0 / xp.sqrt(ms[:, None])                  # (N, 1)
    xhat = (x2 * rstd).astype(x.dtype, copy=False)     # (N, d), back in the input dtype
    y = xhat * weight                                  # (N, d)
    return y.reshape(x.shape), (xhat, rstd.astype(x.dtype, copy=False), weight)


def rmsnorm_backward(dy, cache, need_dweight: bool = True):
    """Returns ``(dx, dweight)``; ``dweight`` is ``None`` unless asked for."""
    xp = backend.get_namespace(dy)
    xhat, rstd, weight = cache
    d = weight.shape[0]
    dy2 = dy.reshape(-1, d)                            # (N, d)
    dweight = xp.einsum("nd,nd->d", dy2, xhat) if need_dweight else None   # (d,)
    u = dy2 * weight                                   # (N, d)
    proj = xp.einsum("nd,nd->n", u, xhat)              # (N,) d · mean(u ⊙ x̂)
    proj *= 1.0 / d
    u -= xhat * proj[:, None]
    u *= rstd
    return u.reshape(dy.shape), dweight
