"""``y = tanh(x)`` (the BERT pooler's activation); ``dx = dy ⊙ (1 - y²)`` needs only y.
docs/pretrained.md#pooler"""
from __future__ import annotations

from .. import backend


def tanh_forward(x):
    """``x (...)`` -> ``(y, y)``."""
    xp = backend.get_namespace(x)
    y = xp.tanh(x)
    return y, y


def tanh_backward(dy, y):
    dx = y * y                           # (...)
    dx *= -1.0
    dx += 1.0                            # 1 - y²
    dx *= dy
    return dx
