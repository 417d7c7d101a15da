"""The modules transformers are built from: Embedding, LayerNorm, and one residual block whose
options cover GPT-2 and BERT alike (docs/pretrained.md#blocks):

* ``causal``: causal attention (GPT) or bidirectional with a key-padding mask (BERT);
* ``pre_ln``: ``x + attn(ln1(x))`` (GPT) or ``ln1(x + attn(x))`` (BERT, post-LayerNorm);
* ``gelu``: ``"tanh"`` (GPT-2) or ``"erf"`` (BERT); LayerNorm eps lives in each LayerNorm.

Each module is a thin stateful shell around the functional ops: ``forward(x) -> (y, cache)``
and ``backward(dy, cache) -> dx``, accumulating into its Parameters and skipping every gradient
of a frozen one. The projections are looked up as attributes at call time, so
``adapters.inject`` can swap in an adapted layer.

A block's parameter *names* are its model's (GPT: ``ln1, attn.q, ..., mlp.fc2``; BERT:
``attention.self.query, ..., output.LayerNorm``): a subclass says where each part lives
(``parts()``), and the computation below is written once.

The residual stream is ``(B, T, d)``; projections see it flattened to ``(N, d)``, N = B·T (a
free view): one large GEMM instead of NumPy's loop of B smaller ones over a 3-D operand.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import backend
from ..nn.layers import Linear
from ..nn.module import Module, Parameter
from ..ops.attention import (attention_backward, attention_cached, attention_forward,
                             attention_varlen_backward, attention_varlen_forward)
from ..ops.embedding import embedding_backward, embedding_forward
from ..ops.gelu import GELU
from ..ops.layernorm import EPS, layernorm_backward, layernorm_forward


INIT_STD = 0.02


class HostInit:
    """Initial values for a model: drawn on the host (float64 PCG64, cast, then moved), so
    every backend starts bit-identical; ``N(0, std²)`` weights, zero biases, unit LayerNorms."""

    def __init__(self, seed, dtype, xp):
        self.rng = backend.host_rng(seed)
        self.dtype = backend.check_dtype(dtype)
        self.xp = backend.xp_default() if xp is None else xp

    def normal(self, shape, std: float = INIT_STD):
        return backend.host_normal(self.rng, shape, std, self.dtype, self.xp)

    def linear(self, n_in: int, n_out: int, std: float = INIT_STD) -> Linear:
        return Linear.from_arrays(self.normal((n_out, n_in), std),
                                  self.xp.zeros((n_out,), dtype=self.dtype))

    def layernorm(self, d: int, eps: float) -> "LayerNorm":
        xp = self.xp
        return LayerNorm(xp.ones((d,), dtype=self.dtype), xp.zeros((d,), dtype=self.dtype), eps)


def any_trainable(*modules) -> bool:
    """Whether backward through these modules has any parameter gradient to compute."""
    return any(p.trainable for m in modules for p in m.parameters())


class Embedding(Module):
    """``weight (V, d)``; ``forward(idx) -> (W[idx], cache)``; backward scatter-adds into dW.
    ``padding_idx`` (BERT's pad token) names a row that never receives a gradient, as in
    ``torch.nn.Embedding(padding_idx=...)`` (docs/pretrained.md#embeddings)."""

    def __init__(self, weight, padding_idx: int | None = None):
        self.weight = Parameter(weight)
        self.padding_idx = padding_idx

    def forward(self, idx):
        if getattr(self.weight, "multiplies_in_tiles", False):   # kept quantized: the rows only
            return self.weight.take(idx), idx
        return embedding_forward(self.weight.data, idx)

    def backward(self, dout, cache) -> None:
        if self.weight.trainable:
            dweight = embedding_backward(dout, cache, self.weight.shape[0])   # (V, d)
            if self.padding_idx is not None:
                dweight[self.padding_idx] = 0.0
            self.weight.accumulate(dweight)


def check_eps(value) -> None:
    """A config's ``layer_norm_eps``: a number > 0 (ValueError naming the field otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"layer_norm_eps must be a number > 0, got {value!r}")


class LayerNorm(Module):
    def __init__(self, weight, bias, eps: float = EPS):
        self.weight = Parameter(weight)   # (d,) ones
        self.bias = Parameter(bias)       # (d,) zeros
        self.eps = float(eps)

    def forward(self, x):
        return layernorm_forward(x, self.weight.data, self.bias.data, self.eps)

    def backward(self, dy, cache):
        dx, dw, db = layernorm_backward(dy, cache, need_dweight=self.weight.trainable,
                                        need_dbias=self.bias.trainable)
        if dw is not None:
            self.weight.accumulate(dw)
        if db is not None:
            self.bias.accumulate(db)
        return dx


class CausalSelfAttention(Module):
    """The GPT's attention projections ``q, k, v, o`` (each (d, d)), as named in the GPT."""

    def __init__(self, q, k, v, o, n_head: int):
        self.q, self.k, self.v, self.o = q, k, v, o   # name order: q, k, v, o
        self.n_head = n_head


class MLP(Module):
    """The GPT's MLP projections ``fc1 (4d, d)``, ``fc2 (d, 4d)``."""

    def __init__(self, fc1, fc2):
        self.fc1, self.fc2 = fc1, fc2


class Parts(NamedTuple):
    """Where a block's pieces live (resolved at call time: inject may have replaced any)."""
    ln1: LayerNorm       # the attention sub-block's LayerNorm (before it, or after the residual)
    q: Module
    k: Module
    v: Module
    o: Module
    ln2: LayerNorm       # the MLP sub-block's LayerNorm
    fc1: Module
    fc2: Module


class PackedRows(NamedTuple):
    """Which of the ``B·T`` positions the rows of a packed ``(N, d)`` activation are: the
    real tokens of a padded batch, in order (docs/performance.md#unpadding). Only attention
    needs the ``(B, T)`` layout; every other op of a block is row-wise."""
    index: object   # (N,) int: flat positions b·T + t, ascending
    B: int
    T: int
    starts: list | None = None   # host row offsets of each sequence (N at the end), where
    #                              attention runs sequence by sequence (NumPy), else None

    def pack(self, x):
        """``(B, T, d)`` (or ``(B·T, d)``) -> ``(N, d)``, the real rows."""
        return x.reshape(self.B * self.T, x.shape[-1])[self.index]

    def unpack(self, x2):
        """``(N, d)`` -> ``(B, T, d)`` with zero rows at the padded positions."""
        xp = backend.get_namespace(x2)
        full = xp.zeros((self.B * self.T, x2.shape[-1]), dtype=x2.dtype)   # (B·T, d)
        full[self.index] = x2
        return full.reshape(self.B, self.T, x2.shape[-1])


class AttnCache(NamedTuple):
    q: object
    k: object
    v: object
    attention: object
    o: object
    rows: object = None   # PackedRows when the block ran on packed rows


class MLPCache(NamedTuple):
    fc1: object
    gelu: object
    fc2: object


class BlockCache(NamedTuple):
    ln1: object
    attn: AttnCache
    ln2: object
    mlp: MLPCache


class Block(Module):
    """A transformer block; subclasses hold the parameters and return them from ``parts()``,
    and call ``Block.__init__`` with the options (docs/pretrained.md#blocks):
    ``causal`` (else bidirectional with a key-padding mask), ``pre_ln`` (else post-LN),
    ``gelu`` ``"tanh"`` or ``"erf"``."""

    def __init__(self, n_head: int, *, causal: bool = True, pre_ln: bool = True,
                 gelu: str = "tanh"):
        if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1:
            raise ValueError(f"n_head must be an integer >= 1, got {n_head!r}")
        for name, value in (("causal", causal), ("pre_ln", pre_ln)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if gelu not in GELU:
            raise ValueError(f"gelu must be one of {sorted(GELU)}, got {gelu!r}")
        self.n_head, self.causal, self.pre_ln, self.gelu = n_head, causal, pre_ln, gelu

    def parts(self) -> Parts:
        raise NotImplementedError

    # dropout on attention probabilities, in train() mode (BERT's attention_probs_dropout_prob;
    # set by Bert.set_dropout): p and the DeviceRNG its masks come from
    attention_dropout, attention_rng = 0.0, None

    # --- attention sub-block ---------------------------------------------------------------
    def _attn_forward(self, p: Parts, x, key_mask, rows=None):
        """``x (B, T, d)``, or ``(N, d)`` packed rows with ``rows`` (PackedRows)."""
        d = x.shape[-1]
        x2 = x.reshape(-1, d)                          # (N, d)
        q, cq = p.q.forward(x2)                        # (N, d)
        k, ck = p.k.forward(x2)
        v, cv = p.v.forward(x2)
        drop = self.attention_dropout if self.training else 0.0
        if self._per_sequence(rows):
            y2, ca = attention_varlen_forward(q, k, v, self.n_head, rows.starts, drop,
                                              self.attention_rng)    # (N, d)
        else:
            if rows is None:
                B, T = x.shape[0], x.shape[1]
                q3, k3, v3 = (t.reshape(B, T, d) for t in (q, k, v))
            else:
                B, T = rows.B, rows.T
                q3, k3, v3 = (rows.unpack(t) for t in (q, k, v))   # (B, T, d), padded 0
            y, ca = attention_forward(q3, k3, v3, self.n_head, causal=self.causal,
                                      key_mask=key_mask, dropout=drop, rng=self.attention_rng)
            y2 = y.reshape(B * T, d) if rows is None else rows.pack(y)   # (N, d)
        out, co = p.o.forward(y2)                      # (N, d)
        return out.reshape(x.shape), AttnCache(cq, ck, cv, ca, co, rows)

    def _per_sequence(self, rows) -> bool:
        """Whether attention runs sequence by sequence over packed rows (NumPy, bidirectional)."""
        return rows is not None and rows.starts is not None and not self.causal

    def _attn_backward(self, p: Parts, dout, c: AttnCache, need_dx: bool):
        d = dout.shape[-1]
        dy = p.o.backward(dout.reshape(-1, d), c.o)                  # (N, d)
        rows = c.rows
        if self._per_sequence(rows):
            dq, dk, dv = attention_varlen_backward(dy, c.attention)  # each (N, d)
        elif rows is None:
            dy3 = dy.reshape(dout.shape[0], dout.shape[1], d)        # (B, T, d)
            dq, dk, dv = attention_backward(dy3, c.attention)        # each (B, T, d)
        else:
            dq, dk, dv = attention_backward(rows.unpack(dy), c.attention)   # (B, T, d)
            dq, dk, dv = rows.pack(dq), rows.pack(dk), rows.pack(dv)   # each (N, d)
        grads = [layer.backward(g.reshape(-1, d), cl, need_dx=need_dx)   # (N, d) or None
                 for layer, g, cl in ((p.q, dq, c.q), (p.k, dk, c.k), (p.v, dv, c.v))]
        if not need_dx:
            return None
        dx = grads[0]
        dx += grads[1]
        dx += grads[2]
        return dx.reshape(dout.shape)

    # --- MLP sub-block -------------------------------------------------------------------------
    def _mlp_forward(self, p: Parts, x):
        d = x.shape[-1]
        h, c1 = p.fc1.forward(x.reshape(-1, d))        # (N, 4d)
        g, cg = GELU[self.gelu][0](h)
        out, c2 = p.fc2.forward(g)                     # (N, d)
        return out.reshape(x.shape), MLPCache(c1, cg, c2)

    def _mlp_backward(self, p: Parts, dout, c: MLPCache):
        d = dout.shape[-1]
        dg = p.fc2.backward(dout.reshape(-1, d), c.fc2)   # (N, 4d)
        dh = GELU[self.gelu][1](dg, c.gelu)
        return p.fc1.backward(dh, c.fc1).reshape(dout.shape)

    # --- the block -------------------------------------------------------------------------
    def forward(self, x, key_mask=None, rows=None):
        """``x (B, T, d)``, optional ``key_mask (B, T)`` (0 = padded key) -> ``(y, cache)``;
        with ``rows`` (PackedRows) x is ``(N, d)``, the real tokens only, and so is y."""
        p = self.parts()
        if self.pre_ln:
            a, c1 = p.ln1.forward(x)
            a, ca = self._attn_forward(p, a, key_mask, rows)
            x = x + a                      # new array: the caller's x stays intact
            m, c2 = p.ln2.forward(x)
            m, cm = self._mlp_forward(p, m)
            m += x                         # m is fresh (fc2's output, cached by nobody)
            return m, BlockCache(c1, ca, c2, cm)
        a, ca = self._attn_forward(p, x, key_mask, rows)
        a += x                             # a is fresh (o's output)
        h, c1 = p.ln1.forward(a)           # h = LN(x + attn(x))
        m, cm = self._mlp_forward(p, h)
        m += h
        y, c2 = p.ln2.forward(m)           # y = LN(h + mlp(h))
        return y, BlockCache(c1, ca, c2, cm)

    def backward(self, dout, cache: BlockCache, need_dx: bool = True):
        """``dx``, or ``None`` with ``need_dx=False`` (nothing below this block trains)."""
        p = self.parts()
        if self.pre_ln:
            return self._pre_ln_backward(p, dout, cache, need_dx)
        # post-LN: the residual adds the LayerNorm's input gradient to each branch's dx
        dm = p.ln2.backward(dout, cache.ln2)                 # d(h + mlp(h))
        dh = self._mlp_backward(p, dm, cache.mlp)
        dh += dm
        da = p.ln1.backward(dh, cache.ln1)                   # d(x + attn(x))
        dx = self._attn_backward(p, da, cache.attn, need_dx)
        if not need_dx:
            return None
        dx += da
        return dx

    # --- generation with a KV cache (docs/performance.md#kv-cache) -----------------------
    def forward_cached(self, x, kv, past: int):
        """Inference: ``x (B, t, d)`` holds positions ``past .. past+t-1``; their keys and
        values go into ``kv`` (this block's ``(K, V)`` buffers), attention reads the whole
        prefix from it. Returns ``y (B, t, d)``; nothing is kept for a backward."""
        if not self.causal:
            raise ValueError("a KV cache needs causal attention")
        p = self.parts()
        if self.pre_ln:
            a = self._attn_cached(p, p.ln1.forward(x)[0], kv, past)
            a += x                           # x + attn(ln1(x)), a is fresh
            m = self._mlp_forward(p, p.ln2.forward(a)[0])[0]
            m += a
            return m
        a = self._attn_cached(p, x, kv, past)
        a += x
        h = p.ln1.forward(a)[0]
        m = self._mlp_forward(p, h)[0]
        m += h
        return p.ln2.forward(m)[0]

    def _attn_cached(self, p: Parts, x, kv, past: int):
        B, t, d = x.shape
        x2 = x.reshape(B * t, d)                       # (N, d)
        q, k, v = (layer.forward(x2)[0].reshape(B, t, d) for layer in (p.q, p.k, p.v))
        y = attention_cached(q, k, v, self.n_head, kv, past)   # (B, t, d)
        return p.o.forward(y.reshape(B * t, d))[0].reshape(B, t, d)

    def _pre_ln_backward(self, p: Parts, dout, cache: BlockCache, need_dx: bool):
        """With ``need_dx=False`` the attention's input gradient and ln1's backward are
        skipped unless ln1 trains."""
        # the residual stream passes dout through unchanged; each branch adds its own dx
        dx = p.ln2.backward(self._mlp_backward(p, dout, cache.mlp), cache.ln2)
        dx += dout
        need_attn_dx = need_dx or any_trainable(p.ln1)
        da = self._attn_backward(p, dx, cache.attn, need_attn_dx)
        if not need_attn_dx:
            return None
        da = p.ln1.backward(da, cache.ln1)
        if not need_dx:
            return None
        da += dx
        return da


class GPTBlock(Block):
    """Pre-LayerNorm causal block with GPT names: ``ln1, attn.{q,k,v,o}, ln2, mlp.{fc1,fc2}``."""

    def __init__(self, ln1, attn: CausalSelfAttention, ln2, mlp: MLP, **options):
        super().__init__(attn.n_head, **options)
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp

    def parts(self) -> Parts:
        a, m = self.attn, self.mlp
        return Parts(self.ln1, a.q, a.k, a.v, a.o, self.ln2, m.fc1, m.fc2)
