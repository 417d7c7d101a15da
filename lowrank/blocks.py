"""The modules a GPT is built from: Embedding, LayerNorm, attention, MLP, transformer block.

Each is a thin stateful shell around the functional ops: ``forward(x) -> (y, cache)`` and
``backward(dy, cache) -> dx``, accumulating into its Parameters and skipping every gradient
of a frozen one. The projections (``attn.q/k/v/o``, ``mlp.fc1/fc2``) are looked up as
attributes at call time, so ``adapters.inject`` can swap in an adapted layer.

The residual stream is ``(B, T, d)``; projections see it flattened to ``(N, d)``, N = B·T (a
free view): one large GEMM instead of NumPy's loop of B smaller ones over a 3-D operand.
"""
from __future__ import annotations

from .module import Module, Parameter
from .ops.attention import attention_backward, attention_forward
from .ops.embedding import embedding_backward, embedding_forward
from .ops.gelu import gelu_backward, gelu_forward
from .ops.layernorm import layernorm_backward, layernorm_forward


def any_trainable(*modules) -> bool:
    """Whether backward through these modules has any parameter gradient to compute."""
    return any(p.trainable for m in modules for p in m.parameters())


class Embedding(Module):
    """``weight (V, d)``; ``forward(idx) -> (W[idx], cache)``; backward scatter-adds into dW."""

    def __init__(self, weight):
        self.weight = Parameter(weight)

    def forward(self, idx):
        return embedding_forward(self.weight.data, idx)

    def backward(self, dout, cache) -> None:
        if self.weight.trainable:
            self.weight.accumulate(embedding_backward(dout, cache, self.weight.shape[0]))


class LayerNorm(Module):
    def __init__(self, weight, bias):
        self.weight = Parameter(weight)   # (d,) ones
        self.bias = Parameter(bias)       # (d,) zeros

    def forward(self, x):
        return layernorm_forward(x, self.weight.data, self.bias.data)

    def backward(self, dy, cache):
        dx, dw, db = layernorm_backward(dy, cache, need_dweight=self.weight.trainable,
                                        need_dbias=self.bias.trainable)
        if dw is not None:
            self.weight.accumulate(dw)
        if db is not None:
            self.bias.accumulate(db)
        return dx


class CausalSelfAttention(Module):
    """``o(attention(q(x), k(x), v(x)))`` with four separate (d, d) projections (SPEC §3)."""

    def __init__(self, q, k, v, o, n_head: int):
        self.q, self.k, self.v, self.o = q, k, v, o   # name order: q, k, v, o
        self.n_head = n_head

    def forward(self, x):
        B, T, d = x.shape
        x2 = x.reshape(B * T, d)                       # (N, d)
        q, cq = self.q.forward(x2)                     # (N, d)
        k, ck = self.k.forward(x2)
        v, cv = self.v.forward(x2)
        y, ca = attention_forward(q.reshape(B, T, d), k.reshape(B, T, d), v.reshape(B, T, d),
                                  self.n_head)         # (B, T, d)
        out, co = self.o.forward(y.reshape(B * T, d))  # (N, d)
        return out.reshape(B, T, d), (cq, ck, cv, ca, co)

    def backward(self, dout, cache, need_dx: bool = True):
        cq, ck, cv, ca, co = cache
        B, T, d = dout.shape
        dy = self.o.backward(dout.reshape(B * T, d), co)             # (N, d)
        dq, dk, dv = attention_backward(dy.reshape(B, T, d), ca)     # each (B, T, d)
        grads = [layer.backward(g.reshape(B * T, d), c, need_dx=need_dx)   # (N, d) or None
                 for layer, g, c in ((self.q, dq, cq), (self.k, dk, ck), (self.v, dv, cv))]
        if not need_dx:
            return None
        dx = grads[0]
        dx += grads[1]
        dx += grads[2]
        return dx.reshape(B, T, d)


class MLP(Module):
    """``fc2(gelu(fc1(x)))``, fc1 (4d, d), fc2 (d, 4d)."""

    def __init__(self, fc1, fc2):
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x):
        B, T, d = x.shape
        h, c1 = self.fc1.forward(x.reshape(B * T, d))  # (N, 4d)
        g, cg = gelu_forward(h)
        out, c2 = self.fc2.forward(g)                  # (N, d)
        return out.reshape(B, T, d), (c1, cg, c2)

    def backward(self, dout, cache):
        c1, cg, c2 = cache
        B, T, d = dout.shape
        dg = self.fc2.backward(dout.reshape(B * T, d), c2)   # (N, 4d)
        dh = gelu_backward(dg, cg)
        return self.fc1.backward(dh, c1).reshape(B, T, d)


class Block(Module):
    """Pre-LayerNorm residual block: ``x + attn(ln1(x))``, then ``+ mlp(ln2(·))``."""

    def __init__(self, ln1, attn, ln2, mlp):
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp

    def forward(self, x):
        a, c1 = self.ln1.forward(x)
        a, ca = self.attn.forward(a)
        x = x + a                          # new array: the caller's x stays intact
        m, c2 = self.ln2.forward(x)
        m, cm = self.mlp.forward(m)
        m += x                             # m is fresh (fc2's output, cached by nobody)
        return m, (c1, ca, c2, cm)

    def backward(self, dout, cache, need_dx: bool = True):
        """``dx``, or ``None`` with ``need_dx=False`` (nothing below this block trains): then
        the attention's input gradient and ln1's backward are skipped unless ln1 trains."""
        c1, ca, c2, cm = cache
        # the residual stream passes dout through unchanged; each branch adds its own dx
        dx = self.ln2.backward(self.mlp.backward(dout, cm), c2)
        dx += dout
        need_attn_dx = need_dx or any_trainable(self.ln1)
        da = self.attn.backward(dx, ca, need_dx=need_attn_dx)
        if not need_attn_dx:
            return None
        da = self.ln1.backward(da, c1)
        if not need_dx:
            return None
        da += dx
        return da
