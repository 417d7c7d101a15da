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


def add_matmul(c, a, b, alpha: float = 1.0):
    """``c += alpha · (a @ b)`` in place, ``c (N, m)``, ``a (N, k)``, ``b (k, m)``.

    NumPy's ``@`` writes a new array, so ``c += a @ b`` makes and reads back an ``(N, m)``
    temporary. On NumPy float arrays this calls ``cblas_?gemm`` of NumPy's own BLAS with
    ``beta = 1`` instead (found in the library NumPy loaded; the same threads as ``@``), so
    the product lands in ``c`` directly: one memory pass fewer. Where no such symbol is found,
    an operand is laid out so that BLAS cannot read it in place, ``c`` has fewer than
    ``GEMM_MIN_ROWS`` rows, or on CuPy and numpy-strict, the plain expression runs: it is the
    reference the gemm form is tested against (tests/test_blocked.py). A ``b`` that multiplies
    in tiles itself (a quantized base kept in its blocks) adds its product into ``c``."""
    if getattr(b, "multiplies_in_tiles", False) and alpha == 1.0:
        return b.matmul(a, out=c)
    gemm = _cblas_gemm(c.dtype) if type(c) is np.ndarray and c.ndim == 2 \
        and c.shape[0] >= GEMM_MIN_ROWS else None
    layout = None if gemm is None else _gemm_layout(c, a, b)
    if layout is None:
        product = a @ b
        if alpha != 1.0:
            product *= alpha
        c += product
        return c
    (trans_a, lda), (trans_b, ldb) = layout
    n_rows, n_cols = c.shape
    gemm(_ROW_MAJOR, trans_a, trans_b, n_rows, n_cols, a.shape[1], alpha,
         a.ctypes.data, lda, b.ctypes.data, ldb, 1.0, c.ctypes.data, c.strides[0] // c.itemsize)
    return c


def affine(x2, weight, bias=None):
    """``x2 Wᵀ + b``, ``x2 (N, n)``, ``W (m, n)``: with a bias on NumPy the output starts as the
    broadcast bias and BLAS adds the product into it (``add_matmul``), no pass to add it."""
    if bias is None:
        return x2 @ weight.T                                             # (N, m)
    if type(x2) is np.ndarray:   # add_matmul keeps short products in NumPy's own form
        y = np.empty((x2.shape[0], weight.shape[0]), dtype=x2.dtype)     # (N, m)
        y[...] = bias
        return add_matmul(y, x2, weight.T)
    y = x2 @ weight.T
    y += bias
    return y


# Below this many rows the plain form runs: NumPy hands a one-row product to gemv, while
# gemm packs the whole weight first (generation, one token at a time, ran 1.8x slower)
GEMM_MIN_ROWS = 16
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112   # CBLAS enum values
_GEMMS: dict = {}


def _operand(m):
    """``(trans, leading dimension)`` for BLAS to read ``m`` in place, or None."""
    item = m.itemsize
    if m.strides[1] == item and m.strides[0] % item == 0 and m.strides[0] >= item * m.shape[1]:
        return _NO_TRANS, max(1, m.strides[0] // item)
    if m.strides[0] == item and m.strides[1] % item == 0 and m.strides[1] >= item * m.shape[0]:
        return _TRANS, max(1, m.strides[1] // item)
    return None


def _gemm_layout(c, a, b):
    if c.ndim != 2 or a.ndim != 2 or b.ndim != 2 or not (a.dtype == b.dtype == c.dtype) \
            or a.shape[0] != c.shape[0] or b.shape[1] != c.shape[1] or a.shape[1] != b.shape[0] \
            or min(c.shape) == 0 or a.shape[1] == 0 or c.strides[1] != c.itemsize \
            or not c.flags.writeable or np.shares_memory(c, a) or np.shares_memory(c, b):
        return None
    layout = (_operand(a), _operand(b))
    return None if None in layout or c.strides[0] < c.itemsize * c.shape[1] else layout


def _cblas_gemm(dtype):
    """NumPy's BLAS ``cblas_sgemm``/``cblas_dgemm`` through ctypes, or None."""
    key = np.dtype(dtype).char
    if key not in "fd":
        return None
    if key not in _GEMMS:
        _GEMMS[key] = _load_gemm(key)
    return _GEMMS[key]


def _load_gemm(key):
    import ctypes
    try:
        core = getattr(np, "_core", None) or np.core
        library = ctypes.CDLL(core._multiarray_umath.__file__)   # and what it links: the BLAS
    except (OSError, AttributeError):
        return None
    letter = "s" if key == "f" else "d"
    real = ctypes.c_float if key == "f" else ctypes.c_double
    for name, integer in ((f"scipy_cblas_{letter}gemm64_", ctypes.c_int64),   # NumPy's wheels
                          (f"cblas_{letter}gemm64_", ctypes.c_int64),
                          (f"scipy_cblas_{letter}gemm", ctypes.c_int),
                          (f"cblas_{letter}gemm", ctypes.c_int)):
        function = getattr(library, name, None)
        if function is not None:
            pointer = ctypes.c_void_p
            function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer,
                                 integer, real, pointer, integer, pointer, integer, real,
                                 pointer, integer]
            function.restype = None
            return function
    return None


# --- the normal CDF of float32 arrays (backend.normal_cdf; the erf GELU's Φ) --------------------

# Φ(x) = ½ + z·P(z²)/Q(z²), z = x/√2 clipped to [-4, 4] (erf(±4) is ±1 in float32): the
# rational form of erf that Eigen and XLA use for float32, with the ½ folded into P.
# |Δerf| <= 4.5e-7 (<= 8 ulps); the GELU it gives is within 1.4e-6 of float64 on [-6, 6],
# as PyTorch's float32 GELU is (docs/performance.md#erf-gelu).
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
    z = np.multiply(x, np.float32(1.0 / math.sqrt(2.0)))
    np.clip(z, np.float32(-4.0), np.float32(4.0), out=z)
    z2 = np.multiply(z, z)
    phi = _horner(z2, _ERF_P, None)
    phi *= z
    phi /= _horner(z2, _ERF_Q, z)       # z is not needed after the line above
    phi += np.float32(0.5)
    return np.clip(phi, np.float32(0.0), np.float32(1.0), out=phi)   # the fit overshoots 1 ulp
