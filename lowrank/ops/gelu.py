"""GELU, tanh form (GPT-2, ``torch.nn.GELU(approximate="tanh")``); the exact erf form (BERT)
follows at the end of the file. The tanh form:

    y = x p,   p = ½ (1 + tanh(u)),   u = c x (1 + a x²),   c = √(2/π), a = 0.044715

With ``1 - tanh²(u) = 4 p (1 - p)`` the derivative needs only x and p (no second tanh):

    dy/dx = p + ½ x (1 - tanh²(u)) u' = p (1 + 2 (1 - p) · c x (1 + 3 a x²))

Written as chains of in-place ops: each line is one pass over a (N, 4d) array, the widest
activation of the model, so the pass count is what matters.
"""
from __future__ import annotations

import math

from .. import backend

_C = math.sqrt(2.0 / math.pi)   # Python floats: float32 inputs stay float32
_A = 0.044715


def gelu_forward(x):
    """``x (...)`` -> ``(y, (x, p))``; x is not modified."""
    xp = backend.get_namespace(x)
    p = x * x
    p *= _C * _A
    p += _C
    p *= x                           # u = c x (1 + a x²)
    xp.tanh(p, out=p)
    p *= 0.5
    p += 0.5                         # p = ½ (1 + tanh u)
    return x * p, (x, p)


def gelu_backward(dy, cache):
    x, p = cache
    dx = x * x
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
    """``y = x Φ(x)``, ``Φ(x) = ½ (1 + erf(x / √2))``; ``x (...)`` -> ``(y, (x, Φ))``."""
    phi = backend.erf(x * _INV_SQRT2)   # (...) fresh array, finished in place
    phi += 1.0
    phi *= 0.5                          # Φ(x)
    return x * phi, (x, phi)


def gelu_erf_backward(dy, cache):
    """``dx = dy · (Φ(x) + x φ(x))``, ``φ(x) = exp(-x²/2) / √(2π)``."""
    xp = backend.get_namespace(dy)
    x, phi = cache
    dx = x * x
    dx *= -0.5
    xp.exp(dx, out=dx)
    dx *= _INV_SQRT_2PI
    dx *= x                             # x φ(x)
    dx += phi
    dx *= dy
    return dx


GELU = {"tanh": (gelu_forward, gelu_backward), "erf": (gelu_erf_forward, gelu_erf_backward)}
