"""An inverted-dropout multiplier kept as one byte per element (docs/variants.md#dropout).

An adapter with dropout sees ``x_d = x ⊙ mask`` with ``mask`` 0 or ``1/(1-p)``. Its backward
needs ``x_d`` again (``dA = duᵀ x_d``) and the mask (``dx ⊙ mask``). Keeping both as float
arrays cost two input-sized arrays per adapted linear per step: on SmolLM2 with every linear
adapted, 686 MB of a step's 1.47 GB of caches. ``DropoutMask`` keeps the kept/dropped bits
(``bool``, one byte) and the scale, and forms ``x ⊙ mask`` when it is needed, block by block.

``apply(x)`` is bit-identical to ``x * keep_mask``: the float multiplier's values are exactly
``1 · s`` and ``0 · s`` with ``s = dtype(1/(1-p))``, and ``(x · 1) · s = x · s``,
``(x · 0) · s = x · 0`` (signed zeros included). A multiplier given as an array (a caller's
fixed ``dropout_mask``, or CuPy and numpy-strict, where a GPU array is applied in one launch
anyway) is kept as it is and multiplied in.
"""
from __future__ import annotations

import numpy as np

from .blocked import map_rows


class DropoutMask:
    """``keep`` (bool, x's shape) and ``scale``, or a dense multiplier ``dense`` (x's shape)."""

    __slots__ = ("keep", "scale", "dense")

    def __init__(self, keep=None, scale: float = 1.0, dense=None):
        if (keep is None) == (dense is None):
            raise ValueError("a DropoutMask holds either keep bits or a dense multiplier")
        self.keep, self.scale, self.dense = keep, scale, dense

    @property
    def compact(self) -> bool:
        """Whether the multiplier is kept as bits (then the caller need not keep ``x_d``)."""
        return self.dense is None

    def apply(self, x, in_place: bool = False):
        """``x ⊙ multiplier`` (x's shape); ``in_place`` writes it into ``x`` (then returned)."""
        if self.dense is not None:
            if in_place:
                x *= self.dense
                return x
            return x * self.dense
        k = x.shape[-1]
        rows, keep = x.reshape(-1, k), self.keep.reshape(-1, k)          # (N, k) rows
        scale = x.dtype.type(self.scale)
        if not (in_place and np.shares_memory(rows, x)):
            return map_rows(_keep_chain, rows, keep, scale).reshape(x.shape)
        for start in range(0, rows.shape[0], _BLOCK_ROWS):   # blocks that stay in cache
            block = rows[start:start + _BLOCK_ROWS]
            _keep_chain(block, keep[start:start + _BLOCK_ROWS], scale, out=(block,))
        return x

    def multiplier(self, dtype):
        """The dense float multiplier (x's shape): ``keep · scale``, or the array given."""
        if self.dense is not None:
            return self.dense
        return np.multiply(self.keep, np.dtype(dtype).type(self.scale), dtype=dtype)


_BLOCK_ROWS = 64


def _keep_chain(x, keep, scale, out=None):
    y = None if out is None else out[0]
    y = np.multiply(x, keep, out=y)      # x · 1 or x · 0 (the sign of x's zero kept)
    y *= scale
    return y
