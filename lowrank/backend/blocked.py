"""The CPU kernel layer: chains of elementwise and row-wise work run block by block
(docs/performance.md#blocked-kernels).

An op written as plain ``xp`` code (GELU: eight in-place passes over an ``(N, 4d)`` array)
reads and writes the whole array from memory once per pass. ``map_rows(fn, *arrays)`` runs
the *same* function over blocks of rows small enough (``BLOCK_BYTES``) that every pass after
the first finds its data in the core's cache, and writes each block's results into
preallocated outputs (``out=``): one memory round trip instead of one per pass.

The plain call ``fn(*arrays)`` stays the reference: each output row depends only on the
same rows of the inputs (elementwise work, reductions over the last axis), so the blocked
result is bit-identical to it (tests/test_blocked.py checks every op that uses this). On
CuPy one kernel launch per pass is already one memory pass on the device, and numpy-strict
must behave as CuPy, so both get the plain call.
"""
from __future__ import annotations

import math

import numpy as np

BLOCK_BYTES = 256 * 1024   # a few of these per chain stay in a 1 MiB L2


def map_rows(fn, *arrays, outputs: int = 1):
    """``fn(*arrays, out=None)`` computed over blocks of leading-axis rows.

    ``fn`` returns ``outputs`` arrays shaped like ``arrays[0]`` (one array when ``outputs`` is
    1); given ``out`` (a tuple of that many arrays) it writes its results there. Here every
    block gets slices of outputs allocated once, so nothing is copied afterwards. Inputs of
    another leading size, and non-arrays, go whole to every block."""
    first = arrays[0]
    if type(first) is not np.ndarray or first.ndim < 1:
        return fn(*arrays, out=None)
    n = first.shape[0]
    row_bytes = first.itemsize * max(1, math.prod(first.shape[1:]))
    rows = max(1, BLOCK_BYTES // row_bytes)
    if n < 2 * rows:
        return fn(*arrays, out=None)
    sliced = [isinstance(a, np.ndarray) and a.ndim >= 1 and a.shape[0] == n for a in arrays]
    outs = tuple(np.empty_like(first) for _ in range(outputs))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        fn(*(a[start:stop] if s else a for a, s in zip(arrays, sliced)),
           out=tuple(o[start:stop] for o in outs))
    return outs[0] if outputs == 1 else outs
