"""The gated MLP's nonlinearity (docs/llama.md#swiglu): ``y = SiLU(a) ⊙ b``, ``SiLU(a) = a·σ(a)``
(``a`` from gate_proj, ``b`` from up_proj). With ``s = σ(a)``:

    da = dy ⊙ b ⊙ s·(1 + a·(1 - s)),     db = dy ⊙ a·s

σ is computed as ``(1 + tanh(a/2)) / 2``: the same function, with no overflow for large |a|.
"""
from __future__ import annotations

from .. import backend


def swiglu_forward(a, b):
    """``a, b (..., f)`` -> ``(SiLU(a) ⊙ b, (a, b, σ(a)))``."""
    xp = backend.get_namespace(a, b)
    if a.shape != b.shape:
        raise ValueError(f"gate and up must have one shape, got {a.shape} and {b.shape}")
    s = xp.tanh(a * 0.5)
    s += 1.0
    s *= 0.5                                           # σ(a)
    silu = a * s
    return silu * b, (a, b, s)


def swiglu_backward(dy, cache):
    """Returns ``(da, db)``."""
    a, b, s = cache
    db = dy * (a * s)                                  # dy ⊙ SiLU(a)
    da = 1.0 - s
    da *= a
    da += 1.0
    da *= s                                            # SiLU'(a) = s(1 + a(1 - s))
    da *= b
    da *= dy
    return da, db
