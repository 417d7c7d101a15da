"""Inverted dropout (docs/classification.md#dropout): ``y = x ⊙ mask``, mask 1/(1-p) where a
unit is kept and 0 where it is dropped, so E[y] = x and evaluation needs no rescaling;
``dx = dy ⊙ mask``. The mask comes from a ``backend.DeviceRNG`` (drawn where x lives)."""
from __future__ import annotations


def dropout_forward(x, p: float, rng, training: bool = True):
    """``(x ⊙ mask, mask)``; with p = 0 or outside training, ``(x, None)`` (x itself)."""
    if p == 0.0 or not training:
        return x, None
    return rng.dropout(x, p)


def dropout_backward(dy, mask):
    return dy if mask is None else dy * mask
