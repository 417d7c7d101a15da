"""A GGUF base kept in its own blocks: Q8_0, Q4_0, Q4_1 (and F16) weights stay as the file
stores them and are dequantised tile by tile per use (docs/gguf.md#kept-quantized).

Each row of an ``(m, n)`` weight is ``n / 32`` blocks of 32 values. The file's bytes are kept,
only split by field (host-side reinterpretation, no arithmetic): the float16 scale ``d``, the
float16 minimum ``m`` (Q4_1) and the quants (int8 for Q8_0; two 4-bit values per byte for
Q4_0/Q4_1: the low nibbles are values 0..15 of the block, the high nibbles values 16..31).
Dequantisation is the ``gguf`` package's arithmetic, operation for operation, in float32:
Q8_0 ``q · d``; Q4_0 ``d · (q − 8)``; Q4_1 ``d · q + m``; so the values are bit for bit what
``gguf.quants.dequantize`` (and transformers) give.

A product never holds the whole float weight: ``matmul_t`` (``x Wᵀ``, the forward) and
``matmul`` (``G W``, the input gradient) dequantise a tile of rows (``TILE_BYTES`` of float32),
multiply, and drop it. ``.data`` (merging, an init that reads the base) dequantises all of it,
and a frozen weight never gets a gradient.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from .frozen import QuantizedParameter

BLOCK = 32
KEPT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "F16")
TYPE_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "F16": 2}   # bytes per block (F16: value)
TILE_BYTES = 1 << 20   # float32 bytes of one dequantised tile: a few fit in L2/L3


def split_blocks(raw, qtype: str, shape) -> dict:
    """The fields of ``raw`` ((m, bytes per row) uint8 host array, as read) for ``qtype``."""
    m, n = shape
    if qtype not in KEPT_TYPES:
        raise ValueError(f"qtype must be one of {KEPT_TYPES}, got {qtype!r}")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if qtype == "F16":
        if raw.shape != (m, 2 * n):
            raise ValueError(f"an F16 tensor of shape {shape} has {2 * m * n} bytes, got "
                             f"{raw.size}")
        return {"w": raw.view(np.float16).reshape(m, n)}
    if n % BLOCK:
        raise ValueError(f"a {qtype} tensor needs a multiple of {BLOCK} columns, got {n}")
    if raw.shape != (m, n // BLOCK * TYPE_BYTES[qtype]):
        raise ValueError(f"a {qtype} row of {n} values has {n // BLOCK * TYPE_BYTES[qtype]} "
                         f"bytes, got {raw.size // max(m, 1)}")
    blocks = raw.reshape(m, n // BLOCK, TYPE_BYTES[qtype])                 # (m, nb, bytes)
    fields = {"d": np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]}   # (m, nb)
    if qtype == "Q8_0":
        fields["q"] = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)  # (m, nb, 32)
    elif qtype == "Q4_0":
        fields["q"] = np.ascontiguousarray(blocks[..., 2:])                # (m, nb, 16)
    else:
        fields["m"] = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
        fields["q"] = np.ascontiguousarray(blocks[..., 4:])                # (m, nb, 16)
    return fields


def dequantize_fields(fields: dict, qtype: str):
    """The float32 rows ``(k, n)`` of the blocks in ``fields`` (each sliced to k rows).
    Written into one output, in place: the same operations in the same order as the
    ``gguf`` package's, so the same bits, with one float32 array instead of four."""
    if qtype == "F16":
        return fields["w"].astype("float32")
    q = fields["q"]
    xp = backend.get_namespace(q)
    k, nb = q.shape[0], q.shape[1]
    out = xp.empty((k, nb, BLOCK), dtype="float32")                         # (k, nb, 32)
    if qtype == "Q8_0":
        out[...] = q
    else:   # low nibbles are values 0..15 of a block, high nibbles 16..31 (exact in float32)
        out[..., :BLOCK // 2] = q & 15
        out[..., BLOCK // 2:] = q >> 4
        if qtype == "Q4_0":
            out -= 8
    out *= fields["d"].astype("float32")[..., None]
    if qtype == "Q4_1":
        out += fields["m"].astype("float32")[..., None]
    return out.reshape(k, nb * BLOCK)                                       # (k, n)


class GGUFBlocksParameter(QuantizedParameter):
    """A frozen weight kept in its GGUF blocks (``KEPT_TYPES``), multiplied tile by tile.
    ``.data`` dequantises it whole; assigning ``.data`` (a merge) keeps that float array
    instead, so the quantisation error is never compounded."""

    __slots__ = ("fields", "qtype", "_shape", "_dtype", "source")
    kind = "a GGUF"
    multiplies_in_tiles = property(lambda self: self._plain is None)

    def __init__(self, raw, qtype: str, shape, dtype: str = "float32", xp=None, source=""):
        host = split_blocks(raw, qtype, tuple(shape))
        xp = backend.xp_default() if xp is None else xp
        self.fields = {k: backend.asarray(v, xp=xp) for k, v in host.items()}
        self.qtype, self._shape, self._dtype = qtype, tuple(int(s) for s in shape), dtype
        self._plain, self.source = None, source
        self.grad, self.trainable = None, False

    # --- what a quantized Parameter supplies (quant/frozen.py) --------------------------
    def _dequantized(self):
        return self.rows(0, self._shape[0])

    @property
    def _quantized_shape(self):
        return self._shape

    def _quantized_dtype(self):
        return self.xp.empty((0,), dtype=self._dtype).dtype

    def _quantized_nbytes(self) -> int:
        return int(sum(v.nbytes for v in self.fields.values()))

    @property
    def xp(self):
        return backend.get_namespace(next(iter(self.fields.values())))

    @property
    def blocks(self):
        """An array of the weight's backend (for backend checks)."""
        return next(iter(self.fields.values()))

    def zero_grad(self) -> None:
        self.grad = None

    # --- dequantisation and the tiled products -------------------------------------------
    def rows(self, start: int, stop: int):
        """Rows ``start:stop`` of the weight, dequantised, in its dtype ``(k, n)``."""
        part = {k: v[start:stop] for k, v in self.fields.items()}
        out = dequantize_fields(part, self.qtype)
        return out if self._dtype == "float32" else out.astype(self._dtype)

    def take(self, idx):
        """``W[idx]`` for integer ids of any shape: ``(*idx.shape, n)`` (an embedding)."""
        if self._plain is not None:
            return self._plain[idx]
        flat = idx.reshape(-1)                                               # (N,)
        part = {k: v[flat] for k, v in self.fields.items()}
        out = dequantize_fields(part, self.qtype)
        out = out if self._dtype == "float32" else out.astype(self._dtype)
        return out.reshape(*idx.shape, self._shape[1])

    def _tiles(self):
        m, n = self._shape
        step = max(1, TILE_BYTES // (4 * n))
        for start in range(0, m, step):
            stop = min(m, start + step)
            yield start, stop, self.rows(start, stop)                        # (k, n)

    def matmul_t(self, x2, bias=None):
        """``x2 Wᵀ (+ b)``: ``x2 (N, n)`` -> ``(N, m)``, one tile of rows of W at a time."""
        xp = self.xp
        y = xp.empty((x2.shape[0], self._shape[0]), dtype=x2.dtype)          # (N, m)
        for start, stop, tile in self._tiles():
            y[:, start:stop] = x2 @ tile.T                                   # (N, k)
        if bias is not None:
            y += bias
        return y

    def matmul(self, dy2, out=None):
        """``dy2 W``: ``dy2 (N, m)`` -> ``(N, n)``, added into ``out`` when given."""
        xp = self.xp
        if out is None:
            out = xp.zeros((dy2.shape[0], self._shape[1]), dtype=dy2.dtype)  # (N, n)
        for start, stop, tile in self._tiles():
            out += dy2[:, start:stop] @ tile                                 # (N, n)
        return out

    def __repr__(self):
        bits = 8.0 * self.nbytes() / math.prod(self._shape)
        state = f"{self.qtype}, {bits:.3f} bits/weight" if self.is_quantized else "dequantized"
        return f"GGUFBlocksParameter(shape={tuple(self.shape)}, {state})"


__all__ = ["GGUFBlocksParameter", "KEPT_TYPES", "split_blocks", "dequantize_fields", "BLOCK",
           "TILE_BYTES"]
