"""GELU, tanh form (GPT-2, ``torch.nn.GELU(approximate="tanh")``):

    y = ½ x (1 + t),   t = tanh(c (x + a x³)),   c = √(2/π), a = 0.044715
    dy/dx = ½ (1 + t) + ½ x (1 - t²) c (1 + 3 a x²)

The cache keeps x and t so backward does not recompute the tanh.
"""
from __future__ import annotations

import math

from .. import backend

_C = math.sqrt(2.0 / math.pi)   # Python floats: float32 inputs stay float32
_A = 0.044715


def gelu_forward(x):
    """``x (...)`` -> ``(y, (x, t))``; x is not modified."""
    xp = backend.get_namespace(x)
    t = x * x                        # x²; becomes t in place (one temporary for the whole chain)
    t *= _A
    t += 1.0
    t *= x
    t *= _C                          # c (x + a x³)
    xp.tanh(t, out=t)
    y = t + 1.0
    y *= x
    y *= 0.5
    return y, (x, t)


def gelu_backward(dy, cache):
    x, t = cache
    dx = x * x
    dx *= 3.0 * _A
    dx += 1.0
    dx *= _C
    dx *= x
    dx *= 1.0 - t * t               # x (1 - t²) c (1 + 3 a x²)
    dx += t
    dx += 1.0
    dx *= 0.5
    dx *= dy
    return dx
