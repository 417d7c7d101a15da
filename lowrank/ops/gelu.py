"""GELU, tanh form (GPT-2, ``torch.nn.GELU(approximate="tanh")``):

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
