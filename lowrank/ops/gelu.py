"""GELU, tanh form (GPT-2, ``torch.nn.GELU(approximate="tanh")``); the exact erf form (BERT)
follows at the end of the file. The tanh form:

    y = x p,   p = ½ (1 + tanh(u)),   u = c x (1 + a x²),   c = √(2/π), a = 0.044715

With ``1 - tanh²(u) = 4 p (1 - p)`` the derivative needs only x and p (no second tanh):

    dy/dx = p + ½ x (1 - tanh²(u)) u' = p (1 + 2 (1 - p) · c x (1 + 3 a x²))

Written as chains of in-place ops: each line is one pass over a (N, 4d) array, the widest
activation of the model, so the pass count is what matters. On NumPy the chains run block by
block over rows (``backend.blocked.map_rows``, docs/performance.md#blocked-kernels), so each
pass after the first reads from cache; the whole-array call is the reference and gives the
same bits.
"""
from __future__ import annotations

import math

from .. import backend
from ..backend.blocked import map_rows

_C = math.sqrt(2.0 / math.pi)   # Python floats: float32 inputs stay float32
_A = 0.044715


def gelu_forward(x):
    """``x (...)`` -> ``(y, (x, p))``; x is not modified."""
    y, p = map_rows(tanh_chain, x.reshape(-1, x.shape[-1]), outputs=2)   # (N, k) rows
    return y.reshape(x.shape), (x, p.reshape(x.shape))


def tanh_chain(x, out=None):
    """The forward chain on a block (or, ``out=None``, the whole array: the reference)."""
    xp = backend.get_namespace(x)
    y, p = (None, None) if out is None else out
    p = xp.multiply(x, x, out=p)
    p *= _C * _A
    p += _C
    p *= x                           # u = c x (1 + a x²)
    xp.tanh(p, out=p)
    p *= 0.5
    p += 0.5                         # p = ½ (1 + tanh u)
    return xp.multiply(x, p, out=y), p


def gelu_backward(dy, cache):
    x, p = cache
    k = x.shape[-1]
    dx = map_rows(tanh_backward_chain, dy.reshape(-1, k), x.reshape(-1, k), p.reshape(-1, k))
    return dx.reshape(x.shape)


def tanh_backward_chain(dy, x, p, out=None):
    xp = backend.get_namespace(x)
    dx = xp.multiply(x, x, out=None if out is None else out[0])
    dx *= 6.0 * _C * _A
    dx += 2.0 * _C
    dx *= x                          # 2 c x (1 + 3 a x²)
    dx *= 1.0 - p
    dx += 1.0
    dx *= p
    dx *= dy
    return dx


# --- exact (erf) GELU: BERT, torch.nn.GELU() — docs/pretrained.md#erf-gelu ---------------------
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_erf_forward(x):
    """``y = x Φ(x)``, ``Φ(x) = ½ (1 + erf(x / √2))``; ``x (...)`` -> ``(y, slope)``.

    The backward needs only ``dy/dx = Φ(x) + x φ(x)``, ``φ(x) = exp(-x²/2) / √(2π)``, so the
    forward computes it while the block is in cache and the cache is that one array: neither
    x nor Φ is kept, and the backward is one product."""
    y, slope = map_rows(erf_chain, x.reshape(-1, x.shape[-1]), outputs=2)   # (N, k) rows
    return y.reshape(x.shape), slope.reshape(x.shape)


def erf_chain(x, out=None):
    """``(y, slope)`` on a block of rows (or, ``out=None``, the whole array: the reference)."""
    xp = backend.get_namespace(x)
    y, slope = (None, None) if out is None else out
    phi = backend.normal_cdf(x)         # Φ(x)
    y = xp.multiply(x, phi, out=y)
    slope = xp.multiply(x, x, out=slope)
    slope *= -0.5
    xp.exp(slope, out=slope)
    slope *= _INV_SQRT_2PI
    slope *= x                          # x φ(x)
    slope += phi                        # Φ(x) + x φ(x)
    return y, slope


def gelu_erf_backward(dy, slope):
    """``dx = dy · (Φ(x) + x φ(x))``, the slope the forward kept."""
    return dy * slope


GELU = {"tanh": (gelu_forward, gelu_backward), "erf": (gelu_erf_forward, gelu_erf_backward)}
