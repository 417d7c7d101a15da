"""4-bit NormalFloat storage for a frozen weight (QLoRA, Dettmers et al. 2305.14314) —
docs/variants.md#nf4.

The weight, flattened row-major, is cut into blocks of 64; each block keeps its absmax and
one 4-bit index per value into the 16 NF4 code values (the quantiles of N(0, 1) rescaled to
[-1, 1], with an exact 0), two indices per byte (first value in the high nibble). With
``double_quant`` the float32 absmax values are themselves quantized as bitsandbytes does:
their mean is subtracted and the rest stored as 8-bit indices into the signed dynamic map,
blocks of 256, one float32 absmax per block. Storage per weight: 4 + 32/64 = 4.5 bits, or
4 + 8/64 + 32/(64·256) ≈ 4.127 bits with double quantization.

Quantization picks the nearest code (an index into the sorted table, found with the 15
midpoints); dequantization is a table lookup times the block's absmax, done on whichever
backend holds the codes, per use: ``NF4Parameter.data`` dequantizes on every read, so the
forward ``x Wᵀ`` and the input gradient ``dx = G W`` both see ``deq(q(W))``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .. import backend
from .frozen import QuantizedParameter

# The published NF4 code values (QLoRA, appendix E; bitsandbytes' NF4 table), ascending.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
BLOCK = 64
SCALE_BLOCK = 256


def dynamic_map_8bit() -> list:
    """bitsandbytes' signed dynamic 8-bit map (Dettmers 1511.04561) as float32-rounded
    Python floats, ascending: for exponents 10⁻⁶ … 10⁰, 2ⁱ midpoints of an even grid on
    [0.1, 1] (both signs), plus 0 and 1 — 256 values."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = [0.1 + 0.9 * k / 2**i for k in range(2**i + 1)]
        mids = [(a + b) / 2.0 for a, b in zip(edges[:-1], edges[1:])]
        values += [s * 10.0 ** (i - 6) * v for v in mids for s in (1.0, -1.0)]
    return sorted(float(_f32(v)) for v in values)


def _f32(v: float) -> float:
    """``v`` rounded to float32, on the host (the maps are stored in float32)."""
    return float(backend.to_numpy(backend.asarray([v], dtype="float32"))[0])


def _nearest(xp, normalized, table):
    """Index of the nearest table value for every entry of ``normalized`` (table ascending)."""
    mids = (table[1:] + table[:-1]) / 2.0                                  # (len-1,)
    return xp.searchsorted(mids, normalized).astype(xp.uint8)


def _blockwise_absmax(xp, flat, block: int):
    """``(blocks (nb, block), absmax (nb,))`` of ``flat`` zero-padded to whole blocks."""
    pad = (-flat.shape[0]) % block
    if pad:
        flat = xp.concatenate([flat, xp.zeros((pad,), flat.dtype)])
    blocks = flat.reshape(-1, block)                                       # (nb, block)
    return blocks, xp.abs(blocks).max(axis=1)                              # (nb,)


class NF4Tensor(NamedTuple):
    """A quantized (m, n) weight: what is stored, and what dequantization needs."""

    codes: object          # (ceil(numel / 2),) uint8, two 4-bit indices per byte
    absmax: object         # (n_blocks,) float32, or None with double quantization
    q_absmax: object       # (n_blocks,) uint8 indices into the 8-bit dynamic map, or None
    absmax2: object        # (n_blocks / 256,) float32 scale of the quantized absmax, or None
    offset: float          # the mean subtracted before quantizing absmax (0 without)
    shape: tuple
    dtype: str             # the dtype dequantization returns

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Bytes held: codes, scales and (double quantization) the second-level scales and
        the offset."""
        if self.absmax is not None:
            return int(self.codes.nbytes + self.absmax.nbytes)
        return int(self.codes.nbytes + self.q_absmax.nbytes + self.absmax2.nbytes + 4)

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / self.numel


def quantize_nf4(W, double_quant: bool = False) -> NF4Tensor:
    """NF4 storage of ``W`` (any shape; blocks of 64 over its row-major flattening)."""
    xp = backend.get_namespace(W)
    table = xp.asarray(NF4_CODE, dtype="float32")
    flat = W.reshape(-1).astype("float32")
    blocks, absmax = _blockwise_absmax(xp, flat, BLOCK)                    # (nb, 64), (nb,)
    safe = xp.where(absmax > 0, absmax, xp.ones_like(absmax))
    idx = _nearest(xp, blocks / safe[:, None], table).reshape(-1)          # (nb·64,)
    codes = (idx[0::2] << 4) | idx[1::2]                                   # (nb·32,)
    if not double_quant:
        return NF4Tensor(codes, absmax, None, None, 0.0, tuple(W.shape), W.dtype.name)
    offset = float(absmax.mean())
    centered = absmax - offset
    blocks2, absmax2 = _blockwise_absmax(xp, centered, SCALE_BLOCK)        # (nb2, 256)
    safe2 = xp.where(absmax2 > 0, absmax2, xp.ones_like(absmax2))
    dyn = xp.asarray(dynamic_map_8bit(), dtype="float32")
    q_absmax = _nearest(xp, blocks2 / safe2[:, None], dyn).reshape(-1)[:absmax.shape[0]]
    return NF4Tensor(codes, None, q_absmax, absmax2, offset, tuple(W.shape), W.dtype.name)


def scales_of(q: NF4Tensor):
    """The per-block absmax (n_blocks,) float32 that dequantization multiplies by."""
    if q.absmax is not None:
        return q.absmax
    xp = backend.get_namespace(q.q_absmax)
    dyn = xp.asarray(dynamic_map_8bit(), dtype="float32")
    per_block = xp.repeat(q.absmax2, SCALE_BLOCK)[:q.q_absmax.shape[0]]   # (nb,)
    return dyn[q.q_absmax] * per_block + xp.float32(q.offset)


def dequantize_nf4(q: NF4Tensor):
    """``deq(q)``: the (m, n) weight in ``q.dtype``, on the backend that holds the codes."""
    xp = backend.get_namespace(q.codes)
    table = xp.asarray(NF4_CODE, dtype="float32")
    idx = xp.stack([q.codes >> 4, q.codes & 15], axis=1).reshape(-1, BLOCK)   # (nb, 64)
    values = table[idx] * scales_of(q)[:, None]                            # (nb, 64)
    return values.reshape(-1)[:q.numel].reshape(q.shape).astype(q.dtype)


class NF4Parameter(QuantizedParameter):
    """A frozen Parameter stored as NF4 (``quant/frozen.py`` says how ``.data`` behaves)."""

    __slots__ = ("quantized",)
    kind = "an NF4"

    def __init__(self, W, double_quant: bool = False):
        self.quantized = quantize_nf4(W, double_quant)
        self._plain = None
        self.grad = None
        self.trainable = False

    def _dequantized(self):
        return dequantize_nf4(self.quantized)

    @property
    def _quantized_shape(self):
        return self.quantized.shape

    def _quantized_dtype(self):
        xp = backend.get_namespace(self.quantized.codes)
        return xp.empty((0,), dtype=self.quantized.dtype).dtype

    def _quantized_nbytes(self) -> int:
        return self.quantized.nbytes()

    def __repr__(self):
        return f"NF4Parameter(shape={tuple(self.shape)}, dtype={self.dtype}, " \
               f"{'%.3f bits/weight' % self.quantized.bits_per_weight() if self.is_quantized else 'dequantized'})"
