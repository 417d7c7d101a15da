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

import numpy as np

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
    if type(x) is np.ndarray and x.dtype == np.float32:
        phi = phi_float32(x)
    else:
        phi = xp.multiply(x, _INV_SQRT2)
        phi = backend.erf(phi, out=phi)
        phi += 1.0
        phi *= 0.5                      # Φ(x)
    y = xp.multiply(x, phi, out=y)
    slope = xp.multiply(x, x, out=slope)
    slope *= -0.5
    xp.exp(slope, out=slope)
    slope *= _INV_SQRT_2PI
    slope *= x                          # x φ(x)
    slope += phi                        # Φ(x) + x φ(x)
    return y, slope


# Φ(x) = ½ + z·P(z²)/Q(z²), z = x/√2 clipped to [-4, 4] (erf(±4) is ±1 in float32): the
# rational form of erf that Eigen and XLA use for float32, with the ½ folded into P.
# |Δerf| <= 4.5e-7 (<= 8 ulps); the GELU it gives is within 1.4e-6 of float64 on [-6, 6],
# as PyTorch's float32 GELU is (docs/performance.md#erf-gelu). Float64 keeps SciPy's erf.
_ERF_P = tuple(np.float32(0.5 * c) for c in (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02))
_ERF_Q = tuple(np.float32(c) for c in (
    -1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
    -7.37332916720468e-03, -1.42647390514189e-02))


def _horner(z2, coefficients, out):
    out = np.multiply(z2, coefficients[0], out=out)
    for c in coefficients[1:-1]:
        out += c
        out *= z2
    out += coefficients[-1]
    return out


def phi_float32(x):
    """Φ(x) of a float32 NumPy array by the rational form above."""
    z = np.multiply(x, np.float32(_INV_SQRT2))
    np.clip(z, np.float32(-4.0), np.float32(4.0), out=z)
    z2 = np.multiply(z, z)
    phi = _horner(z2, _ERF_P, None)
    phi *= z
    phi /= _horner(z2, _ERF_Q, z)       # z is not needed after the line above
    phi += np.float32(0.5)
    return np.clip(phi, np.float32(0.0), np.float32(1.0), out=phi)   # the fit overshoots 1 ulp


def gelu_erf_backward(dy, slope):
    """``dx = dy · (Φ(x) + x φ(x))``, the slope the forward kept."""
    return dy * slope


GELU = {"tanh": (gelu_forward, gelu_backward), "erf": (gelu_erf_forward, gelu_erf_backward)}
