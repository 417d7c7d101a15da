"""Rotary position embeddings in transformers' rotate-half layout (docs/llama.md#rope).

For a head vector ``x (hs,)`` at position p, with ``x = [x₁, x₂]`` (halves) and
``θ_i = p · inv_freq_i`` repeated over both halves (``cos, sin (hs,)``):

    y = x ⊙ cos + rotate_half(x) ⊙ sin,    rotate_half([x₁, x₂]) = [-x₂, x₁]

i.e. pair ``(x₁[i], x₂[i])`` turns by angle θ_i. A rotation's inverse is its transpose:

    dx = dy ⊙ cos - rotate_half(dy ⊙ sin)     (rotate_halfᵀ = -rotate_half)

Frequencies (``inv_freq_i = θ^(-2i/d)``, i < d/2) for the rope types transformers names
``default``, ``linear`` (every frequency / factor, i.e. positions / factor) and ``llama3``
(wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` divided by
``factor``, shorter than ``... / high_freq_factor`` kept, a linear blend between). They are
computed in float64 on the host; the angles ``p · inv_freq`` and their cos/sin are computed
in the frequencies' dtype: a model keeps them in its own dtype, so a float32 model forms its
tables in float32 as transformers does (whatever the model's dtype, transformers' are
float32), and a float64 model in float64.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend

ROPE_TYPES = ("default", "linear", "llama3")
LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                 "original_max_position_embeddings")


def inv_freq(head_dim: int, theta: float, rope_type: str = "default",
             scaling: dict | None = None) -> np.ndarray:
    """Host float64 ``(head_dim/2,)`` inverse frequencies of ``rope_type`` (host-side: a
    constant of the model, computed once)."""
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported (lowrank implements "
                         f"{list(ROPE_TYPES)})")
    base = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = scaling or {}
    if rope_type == "default":
        return base
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return base / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    wavelen = 2.0 * math.pi / base
    out = np.where(wavelen > old / low, base / factor, base)        # long waves: / factor
    smooth = (old / wavelen - low) / (high - low)
    blended = (1.0 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, blended, out)


def rope_tables(freq, positions, dtype):
    """``freq (hs/2,)`` on the positions' backend, ``positions (B, T)`` int -> ``(cos, sin)``,
    each ``(B, T, 1, hs)`` in ``dtype`` (broadcast over heads); the angles and their cos/sin
    are computed in ``freq``'s dtype."""
    xp = backend.get_namespace(freq, positions)
    angles = positions.astype(freq.dtype)[:, :, None] * freq        # (B, T, hs/2)
    angles = xp.concatenate([angles, angles], axis=-1)[:, :, None, :]   # (B, T, 1, hs)
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


def rotate_half(x):
    xp = backend.get_namespace(x)
    h = x.shape[-1] // 2
    return xp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope_forward(x, cos, sin):
    """``x (B, T, H, hs)``, tables ``(B, T, 1, hs)`` -> ``(y, (cos, sin))``."""
    y = x * cos
    y += rotate_half(x) * sin
    return y, (cos, sin)


def rope_backward(dy, cache):
    """``dx`` for ``dy (B, T, H, hs)``: the transposed rotation."""
    cos, sin = cache
    dx = dy * cos
    dx -= rotate_half(dy * sin)
    return dx
